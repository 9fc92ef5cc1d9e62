//! Connections for reads, separate from the applier's (design.md invariant 4: reads never block
//! behind or interfere with the applier, and never write).
//!
//! Owns up to `connections_max` PostgreSQL connections as the read-only role. A caller waits at
//! most `wait_max` for a free connection. Connections found closed are dropped and replaced.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a read connection could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// All connections busy for longer than the wait limit.
    #[error("all {0} read connections are busy")]
    Busy(usize),
    /// PostgreSQL refused or is down.
    #[error("cannot connect to PostgreSQL for reading: {0}")]
    Connect(#[from] tokio_postgres::Error),
}

/// A bounded pool of read connections.
pub struct ReadPool {
    config: tokio_postgres::Config,
    idle: Mutex<Vec<tokio_postgres::Client>>,
    permits: std::sync::Arc<Semaphore>,
    connections_max: usize,
    wait_max: Duration,
}

/// A connection lent by the pool; returned to it when dropped (unless closed).
pub struct PooledClient {
    pool: std::sync::Arc<ReadPool>,
    client: Option<tokio_postgres::Client>,
    _permit: OwnedSemaphorePermit,
}

impl ReadPool {
    /// Creates an empty pool; connections are opened on demand.
    pub fn new(config: tokio_postgres::Config, connections_max: usize, wait_max: Duration) -> Self {
        let connections_max = connections_max.max(1);
        ReadPool {
            config,
            idle: Mutex::new(Vec::new()),
            permits: std::sync::Arc::new(Semaphore::new(connections_max)),
            connections_max,
            wait_max,
        }
    }

    /// Borrows a connection, waiting at most the pool's wait limit.
    pub async fn get(self: &std::sync::Arc<Self>) -> Result<PooledClient, PoolError> {
        let permit = tokio::time::timeout(self.wait_max, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| PoolError::Busy(self.connections_max))?
            .map_err(|_| PoolError::Busy(self.connections_max))?;
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let mut found = None;
            while let Some(c) = idle.pop() {
                if !c.is_closed() {
                    found = Some(c);
                    break;
                }
            }
            found
        };
        let client = match reused {
            Some(c) => c,
            None => {
                let (client, conn) = self.config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                client
                    .batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; SET search_path = public; SET default_transaction_read_only = on")
                    .await?;
                client
            }
        };
        Ok(PooledClient {
            pool: self.clone(),
            client: Some(client),
            _permit: permit,
        })
    }
}

impl PooledClient {
    /// The connection.
    pub fn client(&mut self) -> &mut tokio_postgres::Client {
        // Set in `get` and only taken in `drop`.
        self.client
            .as_mut()
            .expect("a pooled client holds a connection until dropped")
    }
}

impl Drop for PooledClient {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if !c.is_closed() {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(c);
            }
        }
    }
}
