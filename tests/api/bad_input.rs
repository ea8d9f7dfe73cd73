//! Bad input: every bad body is a 4xx problem with the failing field, and writes nothing.

use serde_json::{json, Value};

use crate::helpers::TestApp;

/// An order id for `user` made `offset_ms` from now.
fn id_at(user: i64, offset_ms: i64) -> String {
    use orderly::domain::ids::{IdParts, OrderId, UserId};
    use orderly::domain::shard::Gene;
    OrderId::compose(IdParts {
        unix_ms: chrono::Utc::now().timestamp_millis() + offset_ms,
        gene: Gene::of_user(UserId::new(user).unwrap()),
        worker: 0,
        seq: 0,
    })
    .to_string()
}

async fn row_counts(app: &TestApp) -> Vec<i64> {
    let mut v = Vec::new();
    for t in ["orders", "order_items", "order_payments", "order_discounts"] {
        v.push(app.count_shard_rows(t).await);
    }
    for t in ["order_claims", "stock_reservations"] {
        v.push(app.count_commerce_rows(t).await);
    }
    v
}

#[tokio::test]
async fn bad_input_is_refused_with_a_4xx_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let cat = app.catalog(&[100, 100]).await;
    let other_shop = app.catalog(&[100]).await;
    let user = 600;
    let token = app.user_token(user);
    let id = app.new_order_id(user).await;
    let someone_elses_id = app.new_order_id(user + 1).await;
    let p = cat.products[0].clone();
    let good = TestApp::order_body(&id, &[(&p, 1)]);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    let long = "x".repeat(501);
    let many_lines: Vec<Value> = (1..=101)
        .map(|i| json!({"product_id": i.to_string(), "quantity": 1}))
        .collect();
    let stock_before = app.stock_of(&p).await;
    let before = row_counts(&app).await;

    // (name, body, expected status, field named in the problem)
    let cases: Vec<(&str, Value, u16, Option<&str>)> = vec![
        (
            "zero quantity",
            with(&|b| b["items"][0]["quantity"] = json!(0)),
            422,
            Some("items[0].quantity"),
        ),
        (
            "negative quantity",
            with(&|b| b["items"][0]["quantity"] = json!(-3)),
            422,
            Some("items[0].quantity"),
        ),
        (
            "absurd quantity",
            with(&|b| b["items"][0]["quantity"] = json!(1_000_000)),
            422,
            Some("items[0].quantity"),
        ),
        (
            "overflowing quantity",
            with(&|b| {
                b["items"][0]["quantity"] =
                    json!(99999999999999999999u128.to_string().parse::<f64>().unwrap())
            }),
            422,
            None,
        ),
        (
            "fractional quantity",
            with(&|b| b["items"][0]["quantity"] = json!(1.5)),
            422,
            None,
        ),
        (
            "quantity as string",
            with(&|b| b["items"][0]["quantity"] = json!("1")),
            422,
            None,
        ),
        ("no lines", with(&|b| b["items"] = json!([])), 422, Some("items")),
        (
            "101 lines",
            with(&|b| b["items"] = json!(many_lines.clone())),
            422,
            Some("items"),
        ),
        (
            "duplicate product",
            with(&|b| {
                b["items"] = json!([{"product_id": p, "quantity": 1}, {"product_id": p, "quantity": 2}])
            }),
            422,
            Some("items[1].product_id"),
        ),
        (
            "unknown product",
            with(&|b| b["items"][0]["product_id"] = json!("999999")),
            422,
            Some("items[0].product_id"),
        ),
        (
            "bad product id",
            with(&|b| b["items"][0]["product_id"] = json!("abc")),
            422,
            Some("items[0].product_id"),
        ),
        (
            "numeric product id",
            with(&|b| b["items"][0]["product_id"] = json!(5)),
            422,
            None,
        ),
        (
            "two shops",
            with(
                &|b| b["items"] = json!([{"product_id": p, "quantity": 1}, {"product_id": other_shop.products[0], "quantity": 1}]),
            ),
            422,
            Some("items[1].product_id"),
        ),
        ("unknown field", with(&|b| b["price"] = json!(1)), 422, None),
        (
            "unknown field in a line",
            with(&|b| b["items"][0]["unit_price"] = json!(1)),
            422,
            None,
        ),
        (
            "missing address",
            with(&|b| {
                b.as_object_mut().unwrap().remove("address");
            }),
            422,
            None,
        ),
        (
            "empty receiver name",
            with(&|b| b["address"]["name"] = json!("")),
            422,
            Some("address.name"),
        ),
        (
            "over-long remark",
            with(&|b| b["remark"] = json!(long.clone())),
            422,
            Some("remark"),
        ),
        (
            "control characters",
            with(&|b| b["address"]["detail"] = json!("a\u{0}b")),
            422,
            Some("address.detail"),
        ),
        (
            "order id not a number",
            with(&|b| b["order_id"] = json!("12ab")),
            422,
            Some("order_id"),
        ),
        (
            "negative order id",
            with(&|b| b["order_id"] = json!("-5")),
            422,
            Some("order_id"),
        ),
        (
            "order id of another user",
            with(&|b| b["order_id"] = json!(someone_elses_id)),
            422,
            Some("order_id"),
        ),
        (
            "order id as number",
            with(&|b| b["order_id"] = json!(12345)),
            422,
            None,
        ),
        (
            "order id from the future",
            with(&|b| b["order_id"] = json!(id_at(user, 3_600_000))),
            422,
            Some("order_id"),
        ),
        (
            "order id from last week",
            with(&|b| b["order_id"] = json!(id_at(user, -7 * 86_400_000))),
            422,
            Some("order_id"),
        ),
        (
            "unknown coupon",
            with(&|b| b["coupon_ids"] = json!(["424242"])),
            422,
            Some("coupon_ids[0]"),
        ),
        (
            "too many coupons",
            with(&|b| b["coupon_ids"] = json!(["1", "2", "3", "4", "5", "6"])),
            422,
            Some("coupon_ids"),
        ),
        ("body is an array", json!([1, 2]), 422, None),
    ];
    let mut failures = Vec::new();
    for (name, body, status, field) in &cases {
        let (s, problem) = app
            .call("POST", "/v1/orders", Some(&token), Some(body.clone()))
            .await;
        let ok_status = s.as_u16() == *status;
        let ok_type =
            problem["code"].is_string() && problem["status"].as_u64() == Some(u64::from(s.as_u16()));
        let ok_field = field.is_none_or(|f| {
            problem["errors"]
                .as_array()
                .is_some_and(|e| e.iter().any(|x| x["field"] == f))
        });
        if !(ok_status && ok_type && ok_field) {
            failures.push(format!(
                "{name}: expected {status} naming {field:?}, got {s} {problem}"
            ));
        }
    }

    // Query strings.
    for (name, query) in [
        (
            "year 0 in a filter",
            "/v1/orders?created_from=0000-01-01T00:00:00%2B01:00",
        ),
        ("not a time", "/v1/orders?created_to=yesterday"),
        (
            "forged cursor with a negative time",
            "/v1/orders?cursor=djEuLTk5OTk5OTk5OTk5OTk5OTk5LjE",
        ),
        ("unknown filter", "/v1/orders?colour=red"),
        ("bad status", "/v1/orders?status=paid"),
        ("bad consistency", "/v1/orders?consistency=psychic"),
    ] {
        let (s, problem) = app.call("GET", query, Some(&token), None).await;
        if s != reqwest::StatusCode::UNPROCESSABLE_ENTITY || problem["code"] != "validation_failed" {
            failures.push(format!("{name}: expected 422, got {s} {problem}"));
        }
    }

    // Raw bodies: malformed JSON, wrong content type, oversize.
    let raw: Vec<(&str, String, &str, u16)> = vec![
        (
            "malformed JSON",
            "{\"order_id\": ".into(),
            "application/json",
            400,
        ),
        ("not JSON at all", "hello".into(), "application/json", 400),
        ("wrong content type", good.to_string(), "text/plain", 415),
        (
            "oversize body",
            format!("{{\"remark\": \"{}\"}}", "y".repeat(70 * 1024)),
            "application/json",
            413,
        ),
    ];
    for (name, body, ct, status) in raw {
        let (s, problem) = app.call_raw("POST", "/v1/orders", &token, body, ct).await;
        if s.as_u16() != status || !problem["code"].is_string() {
            failures.push(format!("{name}: expected {status}, got {s} {problem}"));
        }
    }

    // Bad life-cycle input on a real order.
    let order = app.place_order(user, &[(&p, 1)]).await;
    let before_changes = row_counts(&app).await;
    let oid = order["order_id"].as_str().unwrap();
    let service = app.service_token();
    let life: Vec<(&str, String, String, Value, u16)> = vec![
        (
            "zero payment",
            format!("/v1/orders/{oid}/payments"),
            service.clone(),
            json!({"transaction_no": "t1", "channel": "c", "amount": 0}),
            422,
        ),
        (
            "overflowing payment",
            format!("/v1/orders/{oid}/payments"),
            service.clone(),
            json!({"transaction_no": "t1", "channel": "c", "amount": i64::MAX}),
            422,
        ),
        (
            "wrong payment amount",
            format!("/v1/orders/{oid}/payments"),
            service.clone(),
            json!({"transaction_no": "t1", "channel": "c", "amount": 1}),
            409,
        ),
        (
            "bad transaction number",
            format!("/v1/orders/{oid}/payments"),
            service.clone(),
            json!({"transaction_no": "a b", "channel": "c", "amount": 1000}),
            422,
        ),
        (
            "version zero",
            format!("/v1/orders/{oid}/cancel"),
            token.clone(),
            json!({"expected_version": 0}),
            422,
        ),
        (
            "missing version",
            format!("/v1/orders/{oid}/cancel"),
            token.clone(),
            json!({}),
            422,
        ),
        (
            "empty patch",
            format!("/v1/orders/{oid}"),
            token.clone(),
            json!({"expected_version": 1}),
            422,
        ),
        (
            "bad order id in path",
            "/v1/orders/notanid/cancel".into(),
            token.clone(),
            json!({"expected_version": 1}),
            404,
        ),
    ];
    for (name, path, tok, body, status) in life {
        let method = if path.ends_with(oid) { "PATCH" } else { "POST" };
        let (s, problem) = app.call(method, &path, Some(&tok), Some(body)).await;
        if s.as_u16() != status || !problem["code"].is_string() {
            failures.push(format!("{name}: expected {status}, got {s} {problem}"));
        }
    }
    assert_eq!(
        row_counts(&app).await,
        before_changes,
        "bad life-cycle input wrote something"
    );
    let (_, still) = app.get_order(user, oid).await;
    assert_eq!(still["version"], 1);

    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let after: Vec<i64> = before
        .iter()
        .zip(&[1, 1, 0, 0, 1, 1])
        .map(|(b, d)| b + d)
        .collect();
    assert_eq!(
        row_counts(&app).await,
        after,
        "only the one good order was written"
    );
    assert_eq!(app.stock_of(&p).await, stock_before - 1);
}
