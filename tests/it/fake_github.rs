//! A fake GitHub REST API: records every request and answers like GitHub.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Router;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Clone, Default)]
pub struct FakeGitHub {
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    pub url: String,
}

impl FakeGitHub {
    pub async fn start() -> FakeGitHub {
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let sink = requests.clone();
        let app = Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let sink = sink.clone();
            async move {
                let mut list = sink.lock().unwrap();
                list.push(Recorded {
                    method: method.to_string(),
                    path: uri.path().to_string(),
                    headers,
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                });
                let id = list.len();
                if method == Method::POST {
                    (
                        StatusCode::CREATED,
                        axum::Json(json!({ "id": id, "html_url": format!("https://github.example/comment/{id}") })),
                    )
                        .into_response()
                } else {
                    axum::Json(json!({})).into_response()
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeGitHub { requests, url }
    }

    pub fn posts(&self, path: &str) -> Vec<Recorded> {
        self.requests.lock().unwrap().iter().filter(|r| r.method == "POST" && r.path == path).cloned().collect()
    }
}
