//! A REST vault: records as JSON resources on the route's upstream (`path` ends in `/{id}`).
//! `GET path/ID` reads one (404: none), `PUT path/ID` (or `POST` to the collection for stores
//! that create on POST only, like json-server) creates one, `PUT` with `If-Match` replaces
//! (conditional when the store honours it), `GET` of the collection lists them (a JSON array),
//! `DELETE path/ID` deletes. No client credentials are sent: the vault is the proxy's.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::{Stored, VaultDoc, VaultError, VaultStore};
use crate::config::VaultCreate;
use crate::envelope::record::RecordId;

/// Largest vault response read (a listing of many records).
const MAX_RESPONSE: usize = 256 * 1024 * 1024;

pub struct RestVault {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `scheme://authority` + the upstream's base path.
    origin: String,
    /// The record path up to `{id}` (`/envelope-keys/`).
    prefix: String,
    create: VaultCreate,
    timeout: Duration,
    label: String,
}

impl RestVault {
    pub fn new(
        upstream: &crate::config::Upstream,
        path: &str,
        create: VaultCreate,
        settings: &crate::config::ServerSettings,
        label: String,
    ) -> Result<RestVault, String> {
        let https = crate::pki::https_connector(settings)?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        let origin = format!(
            "{}://{}{}",
            upstream.scheme, upstream.authority, upstream.base_path
        );
        let prefix = path.strip_suffix("{id}").unwrap_or(path).to_string();
        Ok(RestVault {
            client,
            label,
            origin,
            prefix,
            create,
            timeout: settings.upstream_timeout,
        })
    }

    fn url(&self, id: Option<&RecordId>) -> String {
        match id {
            Some(id) => format!("{}{}{}", self.origin, self.prefix, id.hex()),
            None => format!(
                "{}{}",
                self.origin,
                self.prefix.strip_suffix('/').unwrap_or(&self.prefix)
            ),
        }
    }

    async fn call(
        &self,
        method: Method,
        url: String,
        body: Option<Vec<u8>>,
        if_match: Option<&str>,
    ) -> Result<(StatusCode, Option<String>, Bytes), VaultError> {
        let mut req = Request::builder()
            .method(method)
            .uri(&url)
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(tag) = if_match {
            req = req.header(header::IF_MATCH, tag);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| VaultError::Unavailable(format!("request: {e}")))?;
        let label = &self.label;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| VaultError::Unavailable(format!("{label}: {e}")))?;
            let status = resp.status();
            let etag = resp
                .headers()
                .get(header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|_| VaultError::Unavailable(format!("{label}: response body failed")))?
                .to_bytes();
            Ok((status, etag, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| VaultError::Unavailable(format!("{label}: timed out")))?
    }

    fn failed(&self, what: &str, status: StatusCode) -> VaultError {
        VaultError::Unavailable(format!("{}: {what} answered {status}", self.label))
    }
}

fn parse_doc(body: &[u8], label: &str) -> Result<VaultDoc, VaultError> {
    serde_json::from_slice(body)
        .map_err(|_| VaultError::Malformed(format!("{label}: not a vault document")))
}

#[async_trait]
impl VaultStore for RestVault {
    fn label(&self) -> &str {
        &self.label
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Stored>, VaultError> {
        let (status, etag, body) = self
            .call(Method::GET, self.url(Some(id)), None, None)
            .await?;
        match status {
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(None),
            s if s.is_success() => Ok(Some(Stored {
                doc: parse_doc(&body, &self.label)?,
                version: etag,
            })),
            s => Err(self.failed("GET", s)),
        }
    }

    async fn create(&self, doc: &VaultDoc) -> Result<(), VaultError> {
        let id = doc
            .id()
            .ok_or_else(|| VaultError::Malformed("record id".into()))?;
        let body = serde_json::to_vec(doc).map_err(|e| VaultError::Malformed(e.to_string()))?;
        let (method, url) = match self.create {
            VaultCreate::Put => (Method::PUT, self.url(Some(&id))),
            VaultCreate::Post => (Method::POST, self.url(None)),
        };
        let (status, _, _) = self.call(method, url, Some(body), None).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(self.failed("create", status))
        }
    }

    async fn replace(&self, current: &Stored, doc: &VaultDoc) -> Result<(), VaultError> {
        let id = doc
            .id()
            .ok_or_else(|| VaultError::Malformed("record id".into()))?;
        let body = serde_json::to_vec(doc).map_err(|e| VaultError::Malformed(e.to_string()))?;
        let (status, _, _) = self
            .call(
                Method::PUT,
                self.url(Some(&id)),
                Some(body),
                current.version.as_deref(),
            )
            .await?;
        match status {
            StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => {
                Err(VaultError::Conflict(doc.id.clone()))
            }
            s if s.is_success() => Ok(()),
            s => Err(self.failed("PUT", s)),
        }
    }

    async fn list(&self) -> Result<Vec<Stored>, VaultError> {
        let (status, _, body) = self.call(Method::GET, self.url(None), None, None).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        if !status.is_success() {
            return Err(self.failed("GET (list)", status));
        }
        let docs: Vec<serde_json::Value> = serde_json::from_slice(&body).map_err(|_| {
            VaultError::Malformed(format!(
                "{}: the listing is not a JSON array of records",
                self.label
            ))
        })?;
        // One bad document fails the listing (nothing is managed on a partial view), named so
        // that it can be found and removed.
        docs.into_iter()
            .enumerate()
            .map(|(i, v)| {
                serde_json::from_value::<VaultDoc>(v)
                    .map(|doc| Stored { doc, version: None })
                    .map_err(|e| {
                        VaultError::Malformed(format!(
                            "{}: document {i} of the listing is not a vault document ({e})",
                            self.label
                        ))
                    })
            })
            .collect()
    }

    async fn delete(&self, current: &Stored) -> Result<(), VaultError> {
        let id = current
            .doc
            .id()
            .ok_or_else(|| VaultError::Malformed("record id".into()))?;
        let (status, _, _) = self
            .call(
                Method::DELETE,
                self.url(Some(&id)),
                None,
                current.version.as_deref(),
            )
            .await?;
        match status {
            StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => {
                Err(VaultError::Conflict(current.doc.id.clone()))
            }
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            s => Err(self.failed("DELETE", s)),
        }
    }
}
