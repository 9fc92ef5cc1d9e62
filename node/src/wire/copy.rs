//! `COPY table FROM STDIN` (psql's `\copy`, drivers' bulk loads): the rows a client streams,
//! parsed from PostgreSQL's text or CSV format and written as `INSERT`s of text-form values.
//!
//! Owns the COPY statement's options and the row parser. The rows become ordinary writes:
//! `INSERT INTO table (columns) VALUES ($1, …), …` with every field a value in text form,
//! parsed by PostgreSQL as the column's type on every node (and checked like any text
//! parameter: a time word in a date/time column is refused, never read from each node's
//! clock). A COPY becomes one write while it is small ([`BATCH_BYTES_MAX`]); a larger one
//! is written in several writes of that size, each atomic, as they arrive.

use pg_query::protobuf::{a_const, node::Node as N, CopyStmt};

/// Most bytes of one write of COPY rows, as its log entry holds them (each value also costs
/// [`VALUE_OVERHEAD_BYTES`] there). Small enough that replicating the entry stays well inside
/// the heartbeat interval on a slow machine.
pub const BATCH_BYTES_MAX: usize = 256 << 10;

/// What a value costs in a log entry besides its text (its JSON framing).
pub const VALUE_OVERHEAD_BYTES: usize = 48;

/// Most rows in one `INSERT` (and at most 65,535 parameters).
pub const ROWS_PER_INSERT_MAX: usize = 1000;

/// A `COPY … FROM STDIN` statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyIn {
    /// The table, quoted (`"schema"."name"` or `"name"`).
    pub table: String,
    /// The table's name as text, for looking up its columns (`schema.name`, quoted parts).
    pub table_text: String,
    /// The columns named in the statement, quoted (`None`: all of the table's).
    pub columns: Option<Vec<String>>,
    /// The data's format.
    pub format: Format,
}

/// The data format of a COPY.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Format {
    /// CSV (else PostgreSQL's text format).
    pub csv: bool,
    /// Field delimiter.
    pub delimiter: u8,
    /// The string that stands for NULL.
    pub null: String,
    /// The first line is a header (skipped).
    pub header: bool,
    /// CSV quote character.
    pub quote: u8,
    /// CSV escape character.
    pub escape: u8,
}

impl Format {
    /// PostgreSQL's text format with its defaults (tab, `\N`).
    pub fn text() -> Self {
        Format {
            csv: false,
            delimiter: b'\t',
            null: "\\N".into(),
            header: false,
            quote: b'"',
            escape: b'"',
        }
    }

    /// CSV with its defaults (comma, empty unquoted NULL, `"` quotes).
    pub fn csv() -> Self {
        Format {
            csv: true,
            delimiter: b',',
            null: String::new(),
            ..Format::text()
        }
    }
}

/// Quotes an identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The `COPY … FROM STDIN` of `stmt`; `None` when it is another COPY; `Err` for options raftpg
/// does not support.
pub fn copy_in(stmt: &CopyStmt) -> Option<Result<CopyIn, String>> {
    if !stmt.is_from || stmt.is_program || !stmt.filename.is_empty() {
        return None;
    }
    Some(parse(stmt))
}

fn parse(stmt: &CopyStmt) -> Result<CopyIn, String> {
    let rel = stmt
        .relation
        .as_ref()
        .ok_or_else(|| "COPY FROM needs a table".to_string())?;
    if stmt.where_clause.is_some() {
        return Err("COPY FROM … WHERE is not supported by raftpg; load the rows and delete what you do not want in the same string".into());
    }
    let (table, table_text) = match rel.schemaname.as_str() {
        "" => (quote_ident(&rel.relname), quote_ident(&rel.relname)),
        s => (
            format!("{}.{}", quote_ident(s), quote_ident(&rel.relname)),
            format!("{}.{}", quote_ident(s), quote_ident(&rel.relname)),
        ),
    };
    let columns = match stmt.attlist.is_empty() {
        true => None,
        false => Some(
            stmt.attlist
                .iter()
                .map(|n| match &n.node {
                    Some(N::String(s)) => Ok(quote_ident(&s.sval)),
                    _ => Err("unexpected column in COPY".to_string()),
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    let mut format = Format::text();
    let mut delimiter = None;
    let mut null = None;
    let mut escape = None;
    for o in &stmt.options {
        let Some(N::DefElem(d)) = &o.node else {
            continue;
        };
        let arg = d.arg.as_deref().map(arg_text).unwrap_or_default();
        match d.defname.as_str() {
            "format" => match arg.to_ascii_lowercase().as_str() {
                "text" => format.csv = false,
                "csv" => format.csv = true,
                other => {
                    return Err(format!(
                        "COPY format {other} is not supported by raftpg (text and csv are)"
                    ))
                }
            },
            "delimiter" => delimiter = Some(one_byte(&arg, "delimiter")?),
            "null" => null = Some(arg),
            "header" => {
                format.header = match arg.to_ascii_lowercase().as_str() {
                    "" | "true" | "on" | "1" => true,
                    "false" | "off" | "0" => false,
                    other => return Err(format!("HEADER {other} is not supported by raftpg")),
                }
            }
            // A physical optimization (rows written frozen) with no effect on what the table
            // holds: the rows are ordinary inserts here, frozen later by each node's VACUUM.
            // pgbench's client-side data generation asks for it.
            "freeze" => match arg.to_ascii_lowercase().as_str() {
                "" | "true" | "on" | "1" | "false" | "off" | "0" => {}
                other => return Err(format!("FREEZE {other} is not a boolean")),
            },
            "quote" => format.quote = one_byte(&arg, "quote")?,
            "escape" => escape = Some(one_byte(&arg, "escape")?),
            "encoding"
                if matches!(
                    arg.to_ascii_lowercase().as_str(),
                    "utf8" | "utf-8" | "unicode"
                ) => {}
            other => return Err(format!("COPY option {other} is not supported by raftpg")),
        }
    }
    if format.csv {
        format.delimiter = delimiter.unwrap_or(b',');
        format.null = null.unwrap_or_default();
        format.escape = escape.unwrap_or(format.quote);
    } else {
        format.delimiter = delimiter.unwrap_or(b'\t');
        format.null = null.unwrap_or_else(|| "\\N".into());
    }
    Ok(CopyIn {
        table,
        table_text,
        columns,
        format,
    })
}

fn arg_text(n: &pg_query::protobuf::Node) -> String {
    match &n.node {
        Some(N::String(s)) => s.sval.clone(),
        Some(N::AConst(c)) => match &c.val {
            Some(a_const::Val::Sval(s)) => s.sval.clone(),
            Some(a_const::Val::Ival(i)) => i.ival.to_string(),
            Some(a_const::Val::Boolval(b)) => b.boolval.to_string(),
            _ => String::new(),
        },
        Some(N::Boolean(b)) => b.boolval.to_string(),
        Some(N::Integer(i)) => i.ival.to_string(),
        _ => String::new(),
    }
}

fn one_byte(s: &str, what: &str) -> Result<u8, String> {
    match s.as_bytes() {
        [b] if b.is_ascii() => Ok(*b),
        _ => Err(format!("COPY {what} must be a single one-byte character")),
    }
}

/// A row: its fields (`None`: NULL).
pub type Row = Vec<Option<String>>;

/// Parses COPY data as it arrives in pieces.
#[derive(Debug)]
pub struct Parser {
    format: Format,
    buf: Vec<u8>,
    /// Line number of the next row (1-based), for errors.
    line: u64,
    header_pending: bool,
    /// The end-of-data marker (`\.`) was seen.
    ended: bool,
}

impl Parser {
    /// A parser of `format`.
    pub fn new(format: Format) -> Self {
        Parser {
            header_pending: format.header,
            format,
            buf: Vec::new(),
            line: 1,
            ended: false,
        }
    }

    /// The line number of the next row.
    pub fn line(&self) -> u64 {
        self.line
    }

    /// Adds data and returns the complete rows in it.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<Row>, String> {
        self.buf.extend_from_slice(data);
        self.rows(false)
    }

    /// The rows left at the end of the data (a last line without a newline).
    pub fn finish(&mut self) -> Result<Vec<Row>, String> {
        self.rows(true)
    }

    fn rows(&mut self, at_end: bool) -> Result<Vec<Row>, String> {
        let mut out = Vec::new();
        let mut start = 0;
        while !self.ended && start < self.buf.len() {
            let Some(end) = self.record_end(start, at_end) else {
                break;
            };
            let mut line = &self.buf[start..end.0];
            start = end.1;
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            if line == b"\\." {
                self.ended = true;
                break;
            }
            if std::mem::take(&mut self.header_pending) {
                self.line += 1;
                continue;
            }
            let row = match self.format.csv {
                true => csv_fields(line, &self.format),
                false => text_fields(line, &self.format),
            }
            .map_err(|e| format!("line {}: {e}", self.line))?;
            self.line += 1;
            out.push(row);
        }
        self.buf.drain(..start);
        if at_end && !self.buf.is_empty() && !self.ended {
            return Err(format!("line {}: unterminated CSV quoted field", self.line));
        }
        Ok(out)
    }

    /// Where the record starting at `start` ends (its end, and where the next starts), if the
    /// buffer holds all of it.
    fn record_end(&self, start: usize, at_end: bool) -> Option<(usize, usize)> {
        let b = &self.buf[start..];
        if !self.format.csv {
            return match b.iter().position(|c| *c == b'\n') {
                Some(i) => Some((start + i, start + i + 1)),
                None if at_end && !b.is_empty() => Some((self.buf.len(), self.buf.len())),
                None => None,
            };
        }
        // CSV: a newline inside quotes belongs to the field.
        let mut quoted = false;
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if quoted {
                if c == self.format.escape
                    && self.format.escape != self.format.quote
                    && i + 1 < b.len()
                {
                    i += 2;
                    continue;
                }
                if c == self.format.quote {
                    if self.format.escape == self.format.quote
                        && b.get(i + 1) == Some(&self.format.quote)
                    {
                        i += 2;
                        continue;
                    }
                    quoted = false;
                }
            } else if c == self.format.quote {
                quoted = true;
            } else if c == b'\n' {
                return Some((start + i, start + i + 1));
            }
            i += 1;
        }
        (at_end && !quoted && !b.is_empty()).then_some((self.buf.len(), self.buf.len()))
    }
}

/// The fields of a line of PostgreSQL's text format.
fn text_fields(line: &[u8], f: &Format) -> Result<Row, String> {
    let mut out = Vec::new();
    for raw in line.split(|c| *c == f.delimiter) {
        if raw == f.null.as_bytes() {
            out.push(None);
            continue;
        }
        let mut v = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            let c = raw[i];
            if c != b'\\' || i + 1 == raw.len() {
                v.push(c);
                i += 1;
                continue;
            }
            let n = raw[i + 1];
            i += 2;
            match n {
                b'b' => v.push(8),
                b'f' => v.push(12),
                b'n' => v.push(b'\n'),
                b'r' => v.push(b'\r'),
                b't' => v.push(b'\t'),
                b'v' => v.push(11),
                b'0'..=b'7' => {
                    let mut val = u32::from(n - b'0');
                    for _ in 0..2 {
                        match raw.get(i) {
                            Some(d @ b'0'..=b'7') => {
                                val = val * 8 + u32::from(d - b'0');
                                i += 1;
                            }
                            _ => break,
                        }
                    }
                    v.push((val & 0xff) as u8);
                }
                b'x' => {
                    let mut val = 0u32;
                    let mut digits = 0;
                    while digits < 2 {
                        match raw.get(i).and_then(|d| (*d as char).to_digit(16)) {
                            Some(d) => {
                                val = val * 16 + d;
                                i += 1;
                                digits += 1;
                            }
                            None => break,
                        }
                    }
                    if digits == 0 {
                        v.push(b'x');
                    } else {
                        v.push(val as u8);
                    }
                }
                other => v.push(other),
            }
        }
        out.push(Some(String::from_utf8(v).map_err(|_| {
            "invalid byte sequence for encoding \"UTF8\"".to_string()
        })?));
    }
    Ok(out)
}

/// The fields of a CSV record.
fn csv_fields(line: &[u8], f: &Format) -> Result<Row, String> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let mut v = Vec::new();
        let mut was_quoted = false;
        while i < line.len() && line[i] != f.delimiter {
            let c = line[i];
            if c == f.quote {
                was_quoted = true;
                i += 1;
                loop {
                    let Some(&c) = line.get(i) else {
                        return Err("unterminated CSV quoted field".into());
                    };
                    if c == f.escape
                        && line.get(i + 1).is_some_and(|n| {
                            *n == f.quote || (*n == f.escape && f.escape != f.quote)
                        })
                    {
                        v.push(line[i + 1]);
                        i += 2;
                        continue;
                    }
                    if c == f.quote {
                        i += 1;
                        break;
                    }
                    v.push(c);
                    i += 1;
                }
            } else {
                v.push(c);
                i += 1;
            }
        }
        let field = String::from_utf8(v)
            .map_err(|_| "invalid byte sequence for encoding \"UTF8\"".to_string())?;
        out.push(if !was_quoted && field == f.null {
            None
        } else {
            Some(field)
        });
        if i >= line.len() {
            break;
        }
        i += 1; // the delimiter
    }
    Ok(out)
}

/// `INSERT INTO table (columns) VALUES ($1, …), …` for `rows` rows of `columns`.
pub fn insert_sql(table: &str, columns: &[String], rows: usize) -> String {
    let n = columns.len();
    let mut sql = format!("INSERT INTO {table} ({}) VALUES ", columns.join(", "));
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..n {
            if c > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", r * n + c + 1));
        }
        sql.push(')');
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stmt(sql: &str) -> CopyStmt {
        match pg_query::parse(sql, 0).unwrap().protobuf.stmts[0]
            .stmt
            .as_ref()
            .unwrap()
            .node
            .as_ref()
            .unwrap()
        {
            N::CopyStmt(c) => (**c).clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn statements() {
        let c = copy_in(&stmt(
            "COPY s.t (a, \"B\") FROM STDIN WITH (FORMAT csv, HEADER)",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(c.table, "\"s\".\"t\"");
        assert_eq!(c.columns, Some(vec!["\"a\"".into(), "\"B\"".into()]));
        assert!(c.format.csv && c.format.header);
        assert_eq!(c.format.delimiter, b',');
        assert!(copy_in(&stmt("COPY t TO STDOUT")).is_none());
        assert!(copy_in(&stmt("COPY t FROM '/etc/passwd'")).is_none());
        assert!(copy_in(&stmt("COPY t FROM STDIN (FORMAT binary)"))
            .unwrap()
            .is_err());
        let c = copy_in(&stmt("COPY t FROM STDIN")).unwrap().unwrap();
        assert_eq!(c.columns, None);
        assert_eq!(c.format.null, "\\N");
        // pgbench's client-side data generation.
        assert!(copy_in(&stmt("COPY t FROM STDIN WITH (FREEZE ON)"))
            .unwrap()
            .is_ok());
        assert!(copy_in(&stmt("COPY t FROM STDIN (FREEZE maybe)"))
            .unwrap()
            .is_err());
    }

    #[test]
    fn text_format_in_pieces() {
        let mut p = Parser::new(copy_in(&stmt("COPY t FROM STDIN")).unwrap().unwrap().format);
        assert!(p.feed(b"1\ta\\tb\\n\n2\t\\N").unwrap().len() == 1);
        let rows = p.feed(b"\n3\t\\101\\x42\n\\.\n4\tignored\n").unwrap();
        assert_eq!(
            rows,
            vec![
                vec![Some("2".into()), None],
                vec![Some("3".into()), Some("AB".into())]
            ]
        );
        assert!(p.finish().unwrap().is_empty());
        let mut p = Parser::new(copy_in(&stmt("COPY t FROM STDIN")).unwrap().unwrap().format);
        let mut rows = p.feed(b"1\tx\r\n2\ty").unwrap();
        rows.extend(p.finish().unwrap());
        assert_eq!(rows[0], vec![Some("1".into()), Some("x".into())]);
        assert_eq!(rows[1], vec![Some("2".into()), Some("y".into())]);
    }

    #[test]
    fn csv_with_quotes_and_newlines() {
        let f = copy_in(&stmt("COPY t FROM STDIN (FORMAT csv, HEADER true)"))
            .unwrap()
            .unwrap()
            .format;
        let mut p = Parser::new(f);
        let mut rows = p.feed(b"id,name\n1,\"a, \"\"b\"\"\nc\"\n2,").unwrap();
        assert_eq!(
            rows,
            vec![vec![Some("1".into()), Some("a, \"b\"\nc".into())]]
        );
        rows = p.feed(b"\"\"\n3,\n").unwrap();
        assert_eq!(
            rows,
            vec![
                vec![Some("2".into()), Some(String::new())],
                vec![Some("3".into()), None]
            ]
        );
        let mut p = Parser::new(
            copy_in(&stmt("COPY t FROM STDIN (FORMAT csv)"))
                .unwrap()
                .unwrap()
                .format,
        );
        p.feed(b"1,\"open").unwrap();
        assert!(p.finish().is_err());
    }

    #[test]
    fn inserts() {
        assert_eq!(
            insert_sql("\"t\"", &["\"a\"".into(), "\"b\"".into()], 2),
            "INSERT INTO \"t\" (\"a\", \"b\") VALUES ($1, $2), ($3, $4)"
        );
    }
}
