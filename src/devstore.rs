//! A tiny in-memory JSON REST store, so a newcomer can try the proxy with nothing installed,
//! and the load runs have an upstream fast enough to measure the proxy rather than the store.
//! Not for production: nothing is persisted.
//!
//! Any path is a collection: `POST /a/b` adds a document (an `id` is assigned when missing),
//! `GET /a/b` lists it, `GET|PUT|PATCH|DELETE /a/b/{id}` address one document.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Map, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Clone, Default)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    collections: HashMap<String, Vec<Value>>,
    next_id: u64,
}

pub async fn serve(listener: TcpListener, store: Store, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let store = store.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let store = store.clone();
                async move { Ok::<_, Infallible>(store.handle(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn reply(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

fn id_of(v: &Value) -> Option<String> {
    match v.get("id")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Store {
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req.uri().path().trim_end_matches('/').to_string();
        let body = match Limited::new(req.into_body(), 16 << 20).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return reply(StatusCode::PAYLOAD_TOO_LARGE, &Value::Object(Map::new())),
        };
        let parsed: Option<Value> = if body.is_empty() {
            None
        } else {
            match serde_json::from_slice(&body) {
                Ok(v) => Some(v),
                Err(_) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        &serde_json::json!({"error": "invalid JSON"}),
                    );
                }
            }
        };
        let (parent, last) = path.rsplit_once('/').unwrap_or(("", ""));
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let empty = Value::Object(Map::new());
        // A path naming a document inside an existing collection addresses that document.
        let doc_index = inner
            .collections
            .get(parent)
            .and_then(|c| c.iter().position(|d| id_of(d).as_deref() == Some(last)));
        match (method, doc_index) {
            (Method::GET, Some(i)) => reply(StatusCode::OK, &inner.collections[parent][i]),
            (m @ (Method::PUT | Method::PATCH), Some(i)) => {
                let Some(Value::Object(new)) = parsed else {
                    return reply(StatusCode::BAD_REQUEST, &empty);
                };
                let patch = m == Method::PATCH;
                let doc = &mut inner.collections.get_mut(parent).expect("exists")[i];
                if let Value::Object(existing) = doc {
                    let id = existing.get("id").cloned();
                    if !patch {
                        existing.clear();
                    }
                    for (k, v) in new {
                        existing.insert(k, v);
                    }
                    if let Some(id) = id {
                        existing.insert("id".into(), id);
                    }
                }
                reply(StatusCode::OK, doc)
            }
            (Method::DELETE, Some(i)) => {
                inner.collections.get_mut(parent).expect("exists").remove(i);
                reply(StatusCode::OK, &empty)
            }
            (Method::GET, None) => match inner.collections.get(&path) {
                Some(c) => reply(StatusCode::OK, &Value::Array(c.clone())),
                None => reply(StatusCode::NOT_FOUND, &empty),
            },
            (Method::POST, None) => {
                let Some(Value::Object(mut doc)) = parsed else {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        &serde_json::json!({"error": "expected a JSON object"}),
                    );
                };
                if !doc.contains_key("id") {
                    inner.next_id += 1;
                    doc.insert("id".into(), Value::String(inner.next_id.to_string()));
                }
                let doc = Value::Object(doc);
                let collection = inner.collections.entry(path).or_default();
                if let Some(id) = id_of(&doc)
                    && collection
                        .iter()
                        .any(|d| id_of(d).as_deref() == Some(id.as_str()))
                {
                    return reply(
                        StatusCode::CONFLICT,
                        &serde_json::json!({"error": "duplicate id"}),
                    );
                }
                collection.push(doc.clone());
                reply(StatusCode::CREATED, &doc)
            }
            _ => reply(StatusCode::NOT_FOUND, &empty),
        }
    }
}
