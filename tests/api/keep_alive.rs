//! Any ordinary HTTP client works (SPEC 2.11): a keep-alive connection stays usable after
//! every answer, whether or not the route read the request body. Many HTTP/1.1 clients
//! (Python's `http.client` among them) write the headers and the body separately; a server
//! that answers before the body has arrived and leaves it unread must still take the next
//! request on the same connection.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::TestApp;
use crate::openapi::{fetch_document, operations};

/// How long the body follows its headers: long enough that a handler that does not wait for
/// it has answered already (the case that broke), short enough to try every route quickly.
const BODY_DELAY: Duration = Duration::from_millis(30);

/// No answer of this test server takes long; a hung read is a failure, not a wait.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads one Content-Length framed response: its status and body. `Err` says what went wrong
/// (the connection closed, the framing is not Content-Length, the server asked to close).
async fn read_response(stream: &mut TcpStream) -> Result<(u16, String), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut chunk))
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| format!("connection failed: {e}"))?;
        if n == 0 {
            return Err("connection closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => length = value.parse::<usize>().ok(),
            "connection" if value.eq_ignore_ascii_case("close") => {
                return Err(format!("the answer {status} says Connection: close"));
            }
            _ => {}
        }
    }
    let length = length.ok_or_else(|| format!("the answer {status} has no Content-Length"))?;
    while buf.len() < head_end + length {
        let n = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut chunk))
            .await
            .map_err(|_| "the body never came".to_owned())?
            .map_err(|e| format!("connection failed: {e}"))?;
        if n == 0 {
            return Err("connection closed in the body".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).to_string();
    Ok((status, body))
}

/// On one connection: `method path` with its headers in one write and `body` in a second one
/// after [`BODY_DELAY`], its full answer, then `GET /healthz` and its answer. `Err` says which
/// step failed.
async fn body_after_headers_then_another_request(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Result<u16, String> {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| format!("writing the headers: {e}"))?;
    stream.flush().await.map_err(|e| e.to_string())?;
    tokio::time::sleep(BODY_DELAY).await;
    stream
        .write_all(body.as_bytes())
        .await
        .map_err(|e| format!("writing the body: {e}"))?;
    let (status, answer) = read_response(stream)
        .await
        .map_err(|e| format!("first answer: {e}"))?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .map_err(|e| format!("after answering {status} {answer}: writing the next request: {e}"))?;
    match read_response(stream).await {
        Ok((200, _)) => Ok(status),
        Ok((other, b)) => Err(format!(
            "after answering {status}: the next request got {other} {b}"
        )),
        Err(e) => Err(format!(
            "after answering {status} {answer}: the next request: {e}"
        )),
    }
}

#[tokio::test]
async fn keep_alive_survives_a_body_sent_after_the_headers_on_every_write_route() {
    let app = TestApp::spawn().await;
    let doc = fetch_document(&app).await;
    // Real ids for the path parameters, so handlers get as far as they can.
    let cat = app.catalog(&[100]).await;
    let user = 811;
    let order = app.place_order(user, &[(&cat.products[0], 1)]).await;
    let order_id = order["order_id"].as_str().unwrap().to_owned();
    let far = chrono::DateTime::parse_from_rfc3339("2098-01-01T00:00:00Z")
        .unwrap()
        .to_utc();
    let sale = app.flash_sale(&cat.products[0], 5, 1, 1, far, 300).await;
    let sale_id = sale["sale_id"].as_str().unwrap().to_owned();
    let fill = |path: &str| -> String {
        path.replace("{product_id}", &cat.products[0])
            .replace("{shop_id}", &cat.shop.to_string())
            .replace(
                "{id}",
                if path.starts_with("/v1/orders/") {
                    &order_id
                } else if path.starts_with("/v1/users/") {
                    "811"
                } else if path.starts_with("/v1/products/") {
                    &cat.products[0]
                } else if path.starts_with("/v1/flash-sales/") {
                    &sale_id
                } else {
                    "1"
                },
            )
    };
    let writes: Vec<(String, String)> = operations(&doc)
        .into_iter()
        .filter(|(m, _, _)| matches!(m.as_str(), "post" | "put" | "patch" | "delete"))
        .map(|(m, p, _)| (m.to_uppercase(), fill(&p)))
        .collect();
    assert!(
        writes.iter().any(|(m, p)| m == "POST" && p == "/v1/order-ids"),
        "{writes:?}"
    );

    // The buyer (the route that never reads its body is a buyer's: `POST /v1/order-ids`), an
    // administrator, and nobody: every refusal and every answer alike.
    let tokens = [
        ("user", Some(app.user_token(user))),
        ("admin", Some(app.admin_token())),
        ("none", None),
    ];
    let body = json!({"expected_version": 1, "reason": "keep-alive"}).to_string();
    let address = app.base.trim_start_matches("http://").to_owned();
    let mut stream = TcpStream::connect(&address).await.unwrap();
    let mut failures = Vec::new();
    let mut answered = 0;
    for (who, token) in &tokens {
        for (method, path) in &writes {
            match body_after_headers_then_another_request(&mut stream, method, path, token.as_deref(), &body)
                .await
            {
                Ok(_) => answered += 1,
                Err(e) => {
                    failures.push(format!("{method} {path} ({who}): {e}"));
                    // The rest of the routes on a fresh connection.
                    stream = TcpStream::connect(&address).await.unwrap();
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests left their connection unusable:\n{}",
        failures.len(),
        answered + failures.len(),
        failures.join("\n")
    );
}
