//! `Write.Execute`: decodes the request, runs it through [`Service::write`], encodes the
//! applied result.

use std::sync::Arc;

use prost::Message;
use raftpg_proto::v1::write_server::Write;
use raftpg_proto::v1::{ExecuteRequest, ExecuteResponse};
use raftpg_proto::FORWARDED_METADATA;
use tonic::{Request, Response, Status};

use super::auth;
use super::convert;
use super::status::to_status;
use crate::service::{Origin, Service};

/// The write service.
pub struct WriteService {
    svc: Arc<Service>,
}

impl WriteService {
    /// Creates the service.
    pub fn new(svc: Arc<Service>) -> Self {
        WriteService { svc }
    }
}

/// Where a request comes from, by its forwarded mark.
pub fn origin_of<T>(request: &Request<T>) -> Origin {
    match request.metadata().get(FORWARDED_METADATA) {
        Some(_) => Origin::Forwarded,
        None => Origin::Client,
    }
}

#[tonic::async_trait]
impl Write for WriteService {
    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<ExecuteResponse>, Status> {
        let origin = origin_of(&request);
        let principal = auth::principal(&self.svc, &request).await?;
        let req = request.into_inner();
        let bytes = req.encoded_len();
        let mut req = convert::write_request(req, bytes, origin);
        req.principal = principal;
        let outcome = self.svc.write(req).await.map_err(to_status)?;
        Ok(Response::new(convert::execute_response(outcome)))
    }
}
