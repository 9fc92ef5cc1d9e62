//! How a role travels in gRPC metadata: the user name and password a client authenticates
//! with (`raftpg-user`, `raftpg-password`) and the role a node forwards a request as
//! (`raftpg-principal`). gRPC text metadata carries printable ASCII only, and HTTP/2 does not
//! keep a value's leading or trailing spaces, while PostgreSQL role names and passwords are
//! any UTF-8: a value that cannot travel as text goes as binary metadata under the same name
//! with `-bin` (its UTF-8 bytes; gRPC base64-encodes them on the wire). A receiver accepts
//! either form, never both.

use tonic::metadata::{AsciiMetadataValue, BinaryMetadataValue, MetadataMap};

use crate::{PASSWORD_METADATA, PRINCIPAL_METADATA, USER_METADATA};

/// One value's two keys: text, and binary for any other value.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    /// The text key.
    pub text: &'static str,
    /// The binary key (`<text>-bin`).
    pub bin: &'static str,
}

/// The role a client authenticates as.
pub const USER: Field = Field {
    text: USER_METADATA,
    bin: "raftpg-user-bin",
};

/// Its password.
pub const PASSWORD: Field = Field {
    text: PASSWORD_METADATA,
    bin: "raftpg-password-bin",
};

/// The role a forwarding node authenticated (honoured only on the peer port).
pub const PRINCIPAL: Field = Field {
    text: PRINCIPAL_METADATA,
    bin: "raftpg-principal-bin",
};

/// Whether `value` arrives unchanged as text metadata.
fn travels_as_text(value: &str) -> bool {
    !value.is_empty()
        && value.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !value.starts_with(' ')
        && !value.ends_with(' ')
}

/// Sets `field` to `value`, as text when it travels unchanged as text, else as binary.
pub fn insert(meta: &mut MetadataMap, field: Field, value: &str) {
    remove(meta, field);
    if travels_as_text(value) {
        if let Ok(v) = AsciiMetadataValue::try_from(value) {
            meta.insert(field.text, v);
            return;
        }
    }
    meta.insert_bin(field.bin, BinaryMetadataValue::from_bytes(value.as_bytes()));
}

/// Removes both forms of `field`.
pub fn remove(meta: &mut MetadataMap, field: Field) {
    meta.remove(field.text);
    meta.remove_bin(field.bin);
}

/// Why a field could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadField(pub String);

impl std::fmt::Display for BadField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadField {}

/// The value of `field`, from either form; `None` when neither is present.
pub fn get(meta: &MetadataMap, field: Field) -> Result<Option<String>, BadField> {
    match (meta.get(field.text), meta.get_bin(field.bin)) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(BadField(format!(
            "send metadata {} or {}, not both",
            field.text, field.bin
        ))),
        (Some(v), None) => v.to_str().map(|s| Some(s.to_string())).map_err(|_| {
            BadField(format!(
                "metadata {} must be printable ASCII (send {} for other text)",
                field.text, field.bin
            ))
        }),
        (None, Some(v)) => {
            let bytes = v
                .to_bytes()
                .map_err(|_| BadField(format!("metadata {} is not base64", field.bin)))?;
            String::from_utf8(bytes.to_vec())
                .map(Some)
                .map_err(|_| BadField(format!("metadata {} must be UTF-8", field.bin)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_round_trips_in_the_form_it_needs() {
        for (value, as_text) in [
            ("alice", true),
            ("correct horse battery staple", true),
            ("pässwörd", false),
            ("名前", false),
            (" leading", false),
            ("trailing ", false),
            ("tab\there", false),
            ("", false),
        ] {
            let mut meta = MetadataMap::new();
            insert(&mut meta, PASSWORD, value);
            assert_eq!(meta.get(PASSWORD.text).is_some(), as_text, "{value:?}");
            assert_eq!(get(&meta, PASSWORD).unwrap().as_deref(), Some(value));
            // Set again in the other form: the earlier one is gone.
            insert(&mut meta, PASSWORD, "x y");
            assert_eq!(get(&meta, PASSWORD).unwrap().as_deref(), Some("x y"));
        }
    }

    #[test]
    fn both_forms_or_bad_bytes_are_refused() {
        let mut meta = MetadataMap::new();
        meta.insert(USER.text, AsciiMetadataValue::from_static("a"));
        meta.insert_bin(USER.bin, BinaryMetadataValue::from_bytes(b"b"));
        assert!(get(&meta, USER).is_err());
        let mut meta = MetadataMap::new();
        meta.insert_bin(USER.bin, BinaryMetadataValue::from_bytes(&[0xff, 0xfe]));
        assert!(get(&meta, USER).is_err());
        remove(&mut meta, USER);
        assert_eq!(get(&meta, USER), Ok(None));
    }
}
