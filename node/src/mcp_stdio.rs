//! `runtimeai mcp`: the MCP server over stdio for a local agent (an IDE, a desktop assistant),
//! with the same tools as `/mcp`, each a REST call to a cluster over HTTPS with the agent's own
//! API key. A call goes to the first of `--server` that answers; one that cannot be reached is
//! passed over for the next (any member serves the API).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::http::Method;
use futures::future::BoxFuture;
use runtimeai_api::mcp::{Catalogue, Credentials, McpServer, Rest};
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct McpArgs {
    /// A member's REST address (`https://127.0.0.1:8081`); repeat it for failover.
    #[arg(long = "server", env = "RUNTIMEAI_SERVER", value_delimiter = ',', required = true)]
    pub servers: Vec<String>,
    /// The file holding the API key the agent acts with (`rai_...`); or set RUNTIMEAI_TOKEN.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The CA certificate the servers' certificates are checked against (PEM); the system's
    /// roots when absent.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// The tenant to act in (the `tenant_id` header).
    #[arg(long)]
    pub tenant: Option<String>,
}

/// The cluster's REST API over HTTPS, as the agent's key (the client crate, which passes over
/// members it cannot reach).
struct Remote(runtimeai_client::Client);

impl Rest for Remote {
    fn call<'a>(
        &'a self,
        _credentials: &'a Credentials,
        method: Method,
        path_and_query: String,
        body: Option<Value>,
    ) -> BoxFuture<'a, Result<(u16, Value), String>> {
        Box::pin(async move {
            let method = reqwest::Method::from_bytes(method.as_str().as_bytes()).map_err(|e| e.to_string())?;
            self.0.request_raw(method, &path_and_query, body.as_ref()).await.map_err(|e| e.to_string())
        })
    }
}

pub fn run(args: McpArgs) -> anyhow::Result<()> {
    let token = match &args.token_file {
        Some(file) => std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?,
        None => std::env::var("RUNTIMEAI_TOKEN").context("give --token-file or set RUNTIMEAI_TOKEN")?,
    };
    let ca_pem = match &args.ca {
        Some(ca) => Some(std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?),
        None => None,
    };
    let config = runtimeai_client::ClientConfig {
        servers: args.servers,
        token: Some(token.trim().to_string()),
        ca_pem,
        tenant: args.tenant,
        // wait_operation waits up to 5 minutes, in one tool call made of short requests.
        timeout: Some(std::time::Duration::from_secs(60)),
    };
    let remote = Remote(runtimeai_client::Client::new(config)?);
    let document = serde_json::from_str(&runtimeai_api::openapi::document()).context("the OpenAPI document")?;
    let server = McpServer::new(Arc::new(Catalogue::from_document(&document)), Arc::new(remote));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        use rmcp::ServiceExt;
        let running = server.serve(rmcp::transport::stdio()).await.context("the MCP session did not start")?;
        running.waiting().await.context("the MCP session ended badly")?;
        Ok(())
    })
}
