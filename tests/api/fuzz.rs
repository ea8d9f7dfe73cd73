//! Fuzzing the write endpoints (SPEC section 3: "a 5xx means a fault of ours or of a
//! dependency, never bad input"). Arbitrary JSON, plausible bodies with wrong values and raw
//! bytes under any content type go to every write endpoint, with every role's token, on real
//! orders and products and on ids that name nothing. Every answer must be a 2xx or a 4xx
//! problem (`application/problem+json` with a `code`), never a dropped connection, and an
//! answer that is not a 2xx must leave the database as it was: the row counts of every order
//! and commerce table, every order's version and the stock of every product. What a 2xx
//! wrote must read back through the API without a 5xx.
//!
//! One app serves every case of a run: the runner works on a blocking thread and drives each
//! HTTP call on the test's runtime through a [`Handle`]. A case that answered 2xx may write
//! (a valid shop, a payment of the right amount); the snapshot it left is the next baseline,
//! and an order it moved on is replaced by a fresh one in the state the case expected.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use reqwest::header::CONTENT_TYPE;
use serde_json::{json, Map, Number, Value};
use sqlx::AssertSqlSafe;
use tokio::runtime::Handle;

use crate::helpers::TestApp;

/// Cases of the test that runs with the others: a few seconds against one app.
const QUICK_CASES: u32 = 1_000;
/// Cases of the ignored long run, unless `FUZZ_CASES` says otherwise.
const LONG_CASES: u32 = 10_000;
/// Shrinking a failure re-sends requests; a few hundred steps find a small case in seconds.
const MAX_SHRINK_ITERS: u32 = 300;

const OWNER: i64 = 700;
const OTHER_USER: i64 = 701;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_writes_answer_4xx_problems_and_write_nothing() {
    fuzz(QUICK_CASES).await;
}

/// The long run: `FUZZ_CASES=50000 cargo test --test api fuzz -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 10 000 cases or FUZZ_CASES"]
async fn fuzzed_writes_answer_4xx_problems_and_write_nothing_long() {
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .map(|v| v.parse().expect("FUZZ_CASES is a number"))
        .unwrap_or(LONG_CASES);
    fuzz(cases).await;
}

async fn fuzz(cases: u32) {
    let world = World::set_up().await;
    let handle = Handle::current();
    let started = Instant::now();
    let (result, world) = tokio::task::spawn_blocking(move || {
        let strategy = case_strategy(&world.pools);
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: MAX_SHRINK_ITERS,
            ..Config::default()
        });
        let result = runner.run(&strategy, |case| handle.block_on(world.check(&case)));
        (result, world)
    })
    .await
    .expect("fuzz thread");
    let stats = world.stats.lock().unwrap();
    eprintln!(
        "fuzz: {} requests ({cases} cases asked) in {:.1?}; answers by endpoint:",
        stats.requests,
        started.elapsed(),
    );
    for (endpoint, answers) in &stats.answers {
        let line: Vec<String> = answers.iter().map(|(s, n)| format!("{s}x{n}")).collect();
        eprintln!("  {endpoint:<10} {}", line.join(" "));
    }
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ------------------------------------------------------------------ the cases

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Endpoint {
    OrderIds,
    Preview,
    Create,
    Patch,
    Pay,
    Ship,
    Confirm,
    Cancel,
    Refund,
    Invalidate,
    Users,
    Shops,
    Products,
    Stock,
    Coupons,
}

const ENDPOINTS: [Endpoint; 15] = [
    Endpoint::OrderIds,
    Endpoint::Preview,
    Endpoint::Create,
    Endpoint::Patch,
    Endpoint::Pay,
    Endpoint::Ship,
    Endpoint::Confirm,
    Endpoint::Cancel,
    Endpoint::Refund,
    Endpoint::Invalidate,
    Endpoint::Users,
    Endpoint::Shops,
    Endpoint::Products,
    Endpoint::Stock,
    Endpoint::Coupons,
];

impl Endpoint {
    fn method(self) -> &'static str {
        match self {
            Endpoint::Patch => "PATCH",
            _ => "POST",
        }
    }

    /// The path, with `id` in its `{id}` segment if it has one.
    fn path(self, id: &str) -> String {
        match self {
            Endpoint::OrderIds => "/v1/order-ids".into(),
            Endpoint::Preview => "/v1/orders/preview".into(),
            Endpoint::Create => "/v1/orders".into(),
            Endpoint::Patch => format!("/v1/orders/{id}"),
            Endpoint::Pay => format!("/v1/orders/{id}/payments"),
            Endpoint::Ship => format!("/v1/orders/{id}/shipment"),
            Endpoint::Confirm => format!("/v1/orders/{id}/confirm"),
            Endpoint::Cancel => format!("/v1/orders/{id}/cancel"),
            Endpoint::Refund => format!("/v1/orders/{id}/refunds"),
            Endpoint::Invalidate => format!("/v1/orders/{id}/invalidate"),
            Endpoint::Users => "/v1/users".into(),
            Endpoint::Shops => "/v1/shops".into(),
            Endpoint::Products => "/v1/products".into(),
            Endpoint::Stock => format!("/v1/products/{id}/stock"),
            Endpoint::Coupons => "/v1/coupons".into(),
        }
    }

    fn on_an_order(self) -> bool {
        self.path("{id}").starts_with("/v1/orders/{id}")
    }

    /// The names its body knows, nested ones included: the keys of arbitrary objects.
    fn fields(self) -> &'static [&'static str] {
        match self {
            Endpoint::OrderIds => &["order_id"],
            Endpoint::Preview => &["items", "coupon_ids", "product_id", "quantity"],
            Endpoint::Create => &[
                "order_id",
                "items",
                "product_id",
                "quantity",
                "coupon_ids",
                "address",
                "name",
                "phone",
                "region",
                "detail",
                "remark",
            ],
            Endpoint::Patch => &[
                "expected_version",
                "address",
                "name",
                "phone",
                "region",
                "detail",
                "remark",
                "tracking_number",
                "carrier",
            ],
            Endpoint::Pay => &["transaction_no", "channel", "amount"],
            Endpoint::Ship => &["expected_version", "carrier", "tracking_number"],
            Endpoint::Confirm | Endpoint::Cancel | Endpoint::Invalidate => &["expected_version", "reason"],
            Endpoint::Refund => &["refund_no", "amount", "reason"],
            Endpoint::Users => &["user_id", "name", "level"],
            Endpoint::Shops => &["name"],
            Endpoint::Products => &["shop_id", "name", "price", "currency", "stock"],
            Endpoint::Stock => &["quantity"],
            Endpoint::Coupons => &[
                "user_id",
                "shop_id",
                "amount",
                "min_spend",
                "valid_from",
                "valid_to",
                "currency",
            ],
        }
    }
}

/// Whose token the request carries.
#[derive(Debug, Clone, Copy)]
enum Who {
    /// The role the endpoint is meant for.
    Right,
    /// The buyer of the real orders.
    Owner,
    OtherUser,
    /// The merchant of the real orders' shop.
    Merchant,
    OtherMerchant,
    Service,
    Admin,
    Nobody,
    Forged,
}

/// The `{id}` of the path.
#[derive(Debug, Clone)]
enum PathId {
    /// One of the real orders (or products, on the stock route).
    Real(Index),
    /// Digits: almost always an id that names nothing.
    Digits(String),
    /// Not an id at all; already percent-encoded where needed.
    Odd(&'static str),
}

#[derive(Debug, Clone)]
enum Body {
    None,
    Json(Value),
    Raw {
        bytes: Vec<u8>,
        content_type: Option<String>,
    },
}

#[derive(Debug, Clone)]
struct Case {
    endpoint: Endpoint,
    who: Who,
    id: PathId,
    body: Body,
}

/// Real ids and names the strategies draw from, read once the world is set up.
#[derive(Debug, Clone)]
struct Pools {
    products: Vec<String>,
    shops: Vec<String>,
    users: Vec<String>,
    coupons: Vec<String>,
    orders: Vec<String>,
}

fn case_strategy(p: &Pools) -> BoxedStrategy<Case> {
    let who = prop_oneof![
        8 => Just(Who::Right),
        3 => Just(Who::Owner),
        1 => Just(Who::OtherUser),
        2 => Just(Who::Merchant),
        1 => Just(Who::OtherMerchant),
        2 => Just(Who::Service),
        3 => Just(Who::Admin),
        1 => Just(Who::Nobody),
        1 => Just(Who::Forged),
    ];
    let id = prop_oneof![
        8 => any::<Index>().prop_map(PathId::Real),
        1 => "[0-9]{1,22}".prop_map(PathId::Digits),
        1 => select(ODD_PATH_IDS).prop_map(PathId::Odd),
    ];
    let p = p.clone();
    (select(ENDPOINTS.to_vec()), who, id)
        .prop_flat_map(move |(endpoint, who, id)| {
            body(endpoint, &p).prop_map(move |body| Case {
                endpoint,
                who,
                id: id.clone(),
                body,
            })
        })
        .boxed()
}

const ODD_PATH_IDS: &[&str] = &[
    "0",
    "-1",
    "abc",
    "1e3",
    "%20",
    "%F0%9F%98%80",
    "%FF%FE",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551616",
    "%00",
    "1.5",
    "+1",
];

fn body(e: Endpoint, p: &Pools) -> BoxedStrategy<Body> {
    prop_oneof![
        2 => arbitrary_body(e).prop_map(Body::Json),
        3 => plausible(Mode::Loose, e, p).prop_map(Body::Json),
        6 => one_wrong(e, p).prop_map(Body::Json),
        3 => raw(e, p),
        1 => Just(Body::None),
    ]
    .boxed()
}

// ------------------------------------------------------------------ arbitrary JSON

const ODD_STRINGS: &[&str] = &[
    "",
    " ",
    "\n",
    "\t",
    "\u{0}",
    "a\u{7}b",
    "\u{202e}gnp.exe",
    "😀",
    "e\u{301}",
    "\u{feff}",
    "\u{ffff}",
    "\u{10ffff}",
    "' OR '1'='1",
    "%s%n",
    "NaN",
    "null",
    "true",
    "-1",
    "0",
    "1e400",
    "99999999999999999999999",
    "9223372036854775807",
    "\\",
    "\"",
    "<script>",
    "CNY",
    "1",
];

fn odd_string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => select(ODD_STRINGS).prop_map(String::from),
        2 => any::<String>(),
        2 => "[a-zA-Z0-9 _-]{0,24}",
        1 => (select(vec!["x", "é", "😀", "\u{0}", "-"]), select(vec![33usize, 65, 101, 201, 501, 4_096]))
            .prop_map(|(s, n)| s.repeat(n)),
    ]
    .boxed()
}

fn f64_value(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

fn edge_number() -> BoxedStrategy<Value> {
    prop_oneof![
        select(vec![
            0i64,
            -1,
            1,
            2,
            i64::MAX,
            i64::MIN,
            1_000,
            10_000,
            10_001,
            1_000_000_000,
            1_000_000_000_000,
            1_000_000_000_000_000,
            1_000_000_000_000_001,
            (1 << 53) + 1,
            i32::MAX as i64 + 1,
        ])
        .prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        select(vec![1e308, -1e308, 0.5, -0.0, 1e-300, 1.0, 1e15]).prop_map(f64_value),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(f64_value),
    ]
    .boxed()
}

fn leaf() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        edge_number(),
        odd_string().prop_map(Value::String),
    ]
    .boxed()
}

/// A key: mostly a real field name of the endpoint, sometimes anything.
fn key(e: Endpoint) -> BoxedStrategy<String> {
    prop_oneof![
        4 => select(e.fields()).prop_map(String::from),
        1 => any::<String>(),
    ]
    .boxed()
}

fn arbitrary_value(e: Endpoint) -> BoxedStrategy<Value> {
    leaf()
        .prop_recursive(4, 48, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::vec((key(e), inner), 0..8)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
        .boxed()
}

/// Mostly an object (the shape of every body), sometimes any value.
fn arbitrary_body(e: Endpoint) -> BoxedStrategy<Value> {
    prop_oneof![
        1 => arbitrary_value(e),
        4 => prop::collection::vec((key(e), arbitrary_value(e)), 0..8)
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
    ]
    .boxed()
}

/// A value of the wrong type or at an edge, for a real field.
fn wrong() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => leaf(),
        // Of the right type for most fields, so past the parser into the checks.
        3 => odd_string().prop_map(Value::String),
        2 => edge_number(),
        1 => Just(json!({})),
        1 => Just(json!([])),
        1 => Just(json!({"a": {"b": [1, {"c": null}]}, "name": "x"})),
        1 => prop::collection::vec(leaf(), 0..4).prop_map(Value::Array),
        // Past the body limit (64 KiB): a 413.
        1 => Just(Value::String("y".repeat(70 * 1024))).no_shrink(),
        // Deeper than serde_json's recursion limit (128) when the depth allows.
        1 => select(vec![16usize, 127, 200]).prop_map(|depth| {
            (0..depth).fold(json!(1), |v, _| json!([v]))
        }),
    ]
    .boxed()
}

// ------------------------------------------------------------------ plausible bodies

/// How plausible a body's values are: `Loose` mixes in odd strings and edge numbers
/// everywhere, `Valid` draws only values the endpoint accepts (one may be spoilt later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Loose,
    Valid,
}

/// Stands for an order id issued to the owner just before the case is sent: a valid create
/// needs a fresh id every time.
const FRESH_ORDER_ID: &str = "<fresh order id>";

fn pick(v: &[String]) -> BoxedStrategy<Value> {
    select(v.to_vec()).prop_map(Value::String).boxed()
}

fn digits() -> BoxedStrategy<Value> {
    "[0-9]{1,20}".prop_map(Value::String).boxed()
}

/// `good` in valid mode; in loose mode sometimes `loose` instead.
fn either(mode: Mode, good: BoxedStrategy<Value>, loose: BoxedStrategy<Value>) -> BoxedStrategy<Value> {
    match mode {
        Mode::Valid => good,
        Mode::Loose => prop_oneof![4 => good, 1 => loose].boxed(),
    }
}

fn ids(mode: Mode, v: &[String]) -> BoxedStrategy<Value> {
    either(mode, pick(v), digits())
}

fn text(mode: Mode) -> BoxedStrategy<Value> {
    either(
        mode,
        "[a-zA-Z][a-zA-Z0-9 ]{0,19}".prop_map(Value::String).boxed(),
        odd_string().prop_map(Value::String).boxed(),
    )
}

/// A channel number: letters, digits, `-` and `_`, up to `max` (and sometimes over).
fn reference(mode: Mode, max: usize) -> BoxedStrategy<Value> {
    let good = proptest::string::string_regex(&format!("[a-zA-Z0-9_-]{{1,{max}}}"))
        .expect("regex")
        .prop_map(Value::String)
        .boxed();
    let loose = prop_oneof![
        Just(Value::String("a".repeat(max + 1))),
        odd_string().prop_map(Value::String),
    ]
    .boxed();
    either(mode, good, loose)
}

fn version(mode: Mode) -> BoxedStrategy<Value> {
    either(mode, (1..=6i64).prop_map(Value::from).boxed(), edge_number())
}

/// Around the price of the real orders (1000).
fn amount(mode: Mode) -> BoxedStrategy<Value> {
    let good = prop_oneof![Just(Value::from(1000)), (1..=5_000i64).prop_map(Value::from)].boxed();
    either(mode, good, edge_number())
}

fn count(mode: Mode) -> BoxedStrategy<Value> {
    either(mode, (1..=20i64).prop_map(Value::from).boxed(), edge_number())
}

fn currency(mode: Mode) -> BoxedStrategy<Value> {
    let loose = select(vec!["cny", "XXX", "", "C", "CNYY", "😀😀😀", "ZZZ"]);
    either(
        mode,
        select(vec!["CNY", "USD", "EUR"]).prop_map(Value::from).boxed(),
        loose.prop_map(Value::from).boxed(),
    )
}

fn time(mode: Mode) -> BoxedStrategy<Value> {
    let now = chrono::Utc::now();
    let near: Vec<String> = [3_600i64, 86_400, 365 * 86_400]
        .iter()
        .map(|s| (now + chrono::TimeDelta::seconds(*s)).to_rfc3339())
        .collect();
    // Valid RFC 3339 at the edges: the first and last storable instants, leap seconds.
    let edges = select(vec![
        "1970-01-01T00:00:00Z",
        "1970-01-01T08:00:00+08:00",
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59.999999999Z",
        "2030-06-30T23:59:60Z",
        "2030-06-30T23:59:60.999999999Z",
        "2030-12-31T23:59:60.5+00:00",
    ]);
    let good = prop_oneof![
        3 => select(near).prop_map(Value::String),
        1 => edges.prop_map(Value::from),
    ];
    let odd = prop_oneof![
        3 => select(vec![
            "1969-12-31T23:59:59Z",
            "2001-01-01T00:00:00Z",
            "1970-01-01T00:30:00+01:00",
            "9999-12-31T23:30:00-01:00",
            "2030-02-30T00:00:00Z",
            "2030-01-01",
            "2030-01-01T00:00:00",
            "0000-01-01T00:00:00Z",
            "+10000-01-01T00:00:00Z",
            "2030-01-01T24:00:00Z",
            "2030-01-01T00:00:00.1234567891234Z",
        ])
        .prop_map(Value::from),
        1 => leaf(),
    ];
    either(mode, good.boxed(), odd.boxed())
}

/// A field of a body: its name, its values, and whether a valid body must hold it.
type Field = (&'static str, BoxedStrategy<Value>, bool);

/// An object of `fields`. Loose: each one absent, plausible or wrong, and now and then a
/// stranger. Valid: the required ones and about half of the others.
fn object_of(mode: Mode, fields: Vec<Field>) -> BoxedStrategy<Value> {
    let parts: Vec<BoxedStrategy<Option<(String, Value)>>> = fields
        .into_iter()
        .map(|(k, good, required)| {
            let good = good.prop_map(move |v| Some((k.to_owned(), v)));
            match mode {
                Mode::Valid if required => good.boxed(),
                Mode::Valid => prop_oneof![Just(None), good].boxed(),
                Mode::Loose => prop_oneof![
                    1 => Just(None),
                    12 => good,
                    2 => wrong().prop_map(move |v| Some((k.to_owned(), v))),
                ]
                .boxed(),
            }
        })
        .collect();
    let stranger = match mode {
        Mode::Loose => prop::option::weighted(0.05, ("[a-z_]{1,12}", leaf())).boxed(),
        Mode::Valid => Just(None).boxed(),
    };
    (parts, stranger)
        .prop_map(|(parts, stranger)| {
            let mut m: Map<String, Value> = parts.into_iter().flatten().collect();
            if let Some((k, v)) = stranger {
                m.insert(k, v);
            }
            Value::Object(m)
        })
        .boxed()
}

fn address(mode: Mode) -> BoxedStrategy<Value> {
    let phone = either(mode, "1[0-9]{10}".prop_map(Value::String).boxed(), text(mode));
    object_of(
        mode,
        vec![
            ("name", text(mode), true),
            ("phone", phone, true),
            ("region", text(mode), false),
            ("detail", text(mode), true),
        ],
    )
}

/// Order lines. Valid: one or two distinct products of the first shop.
fn items(mode: Mode, p: &Pools) -> BoxedStrategy<Value> {
    let quantity = either(
        mode,
        (1..=3i64).prop_map(Value::from).boxed(),
        prop_oneof![
            select(vec![10_000i64, 10_001]).prop_map(Value::from),
            edge_number()
        ]
        .boxed(),
    );
    match mode {
        Mode::Valid => {
            // The last product is the other shop's.
            let first_shop = p.products[..p.products.len() - 1].to_vec();
            (
                prop::sample::subsequence(first_shop, 1..=2),
                prop::collection::vec(quantity, 2),
            )
                .prop_map(|(products, quantities)| {
                    let lines = products
                        .into_iter()
                        .zip(quantities)
                        .map(|(p, q)| json!({"product_id": p, "quantity": q}))
                        .collect();
                    Value::Array(lines)
                })
                .boxed()
        }
        Mode::Loose => {
            let line = object_of(
                mode,
                vec![
                    ("product_id", ids(mode, &p.products), true),
                    ("quantity", quantity, true),
                ],
            );
            prop_oneof![
                8 => prop::collection::vec(line.clone(), 0..4),
                1 => prop::collection::vec(line, 99..=102),
            ]
            .prop_map(Value::Array)
            .boxed()
        }
    }
}

/// Valid: none, or the owner's coupon without a minimum spend (once it is redeemed, a
/// valid create with it answers 409).
fn coupon_ids(mode: Mode, p: &Pools) -> BoxedStrategy<Value> {
    match mode {
        Mode::Valid => prop::collection::vec(Just(Value::String(p.coupons[0].clone())), 0..=1)
            .prop_map(Value::Array)
            .boxed(),
        Mode::Loose => prop::collection::vec(ids(mode, &p.coupons), 0..7)
            .prop_map(Value::Array)
            .boxed(),
    }
}

fn plausible(mode: Mode, e: Endpoint, p: &Pools) -> BoxedStrategy<Value> {
    let fields: Vec<Field> = match e {
        Endpoint::OrderIds => vec![],
        Endpoint::Preview => vec![
            ("items", items(mode, p), true),
            ("coupon_ids", coupon_ids(mode, p), false),
        ],
        Endpoint::Create => {
            let order_id = either(
                mode,
                Just(Value::from(FRESH_ORDER_ID)).boxed(),
                prop_oneof![pick(&p.orders), digits()].boxed(),
            );
            vec![
                ("order_id", order_id, true),
                ("items", items(mode, p), true),
                ("coupon_ids", coupon_ids(mode, p), false),
                ("address", address(mode), true),
                ("remark", text(mode), false),
            ]
        }
        Endpoint::Patch => vec![
            ("expected_version", version(mode), true),
            ("address", address(mode), false),
            ("remark", text(mode), false),
            ("tracking_number", reference(mode, 64), false),
            ("carrier", text(mode), false),
        ],
        Endpoint::Pay => vec![
            ("transaction_no", reference(mode, 64), true),
            ("channel", reference(mode, 32), true),
            ("amount", amount(mode), true),
        ],
        Endpoint::Ship => vec![
            ("expected_version", version(mode), true),
            ("carrier", text(mode), true),
            ("tracking_number", reference(mode, 64), true),
        ],
        Endpoint::Confirm | Endpoint::Cancel | Endpoint::Invalidate => vec![
            ("expected_version", version(mode), true),
            ("reason", text(mode), false),
        ],
        Endpoint::Refund => vec![
            ("refund_no", reference(mode, 64), true),
            ("amount", amount(mode), true),
            ("reason", text(mode), false),
        ],
        Endpoint::Users => vec![
            ("user_id", digits(), false),
            ("name", text(mode), true),
            ("level", count(mode), false),
        ],
        Endpoint::Shops => vec![("name", text(mode), true)],
        Endpoint::Products => vec![
            ("shop_id", ids(mode, &p.shops), true),
            ("name", text(mode), true),
            ("price", amount(mode), true),
            ("currency", currency(mode), false),
            ("stock", count(mode), true),
        ],
        Endpoint::Stock => vec![("quantity", count(mode), true)],
        Endpoint::Coupons => vec![
            ("user_id", ids(mode, &p.users), true),
            ("shop_id", ids(mode, &p.shops), false),
            ("amount", amount(mode), true),
            ("min_spend", amount(mode), false),
            ("valid_to", time(mode), true),
            ("currency", currency(mode), false),
        ],
    };
    object_of(mode, fields)
}

/// A valid body with (seven times in ten) one value spoilt: past every other check, into the
/// one that guards this field. A nested name is spoilt in the address or the first line. A
/// string or a number is mostly spoilt with another of its type, which the parser lets
/// through to the checks.
fn one_wrong(e: Endpoint, p: &Pools) -> BoxedStrategy<Value> {
    let spoil = prop::option::weighted(
        0.7,
        (
            select(e.fields()),
            wrong(),
            odd_string(),
            edge_number(),
            any::<bool>(),
        ),
    );
    (plausible(Mode::Valid, e, p), spoil)
        .prop_map(|(mut body, spoil)| {
            if let Some((k, any_value, string, number, same_type)) = spoil {
                let target = if body.get(k).is_some() {
                    &mut body
                } else if body["address"].get(k).is_some() {
                    &mut body["address"]
                } else if body["items"][0].get(k).is_some() {
                    &mut body["items"][0]
                } else {
                    &mut body
                };
                target[k] = match &target[k] {
                    Value::String(_) if same_type => Value::String(string),
                    Value::Number(_) if same_type => number,
                    _ => any_value,
                };
            }
            body
        })
        .boxed()
}

// ------------------------------------------------------------------ raw bytes

const HUGE_NUMBERS: &[&str] = &[
    "100000000000000000000000000000",
    "-99999999999999999999999999999",
    "1e999",
    "-1e999",
    "1E+2",
    "1.0",
    "0.0000001",
    "-0",
    "00",
    "+1",
    "NaN",
    "Infinity",
    "0x10",
    ".5",
];

const RAW_TEXTS: &[&str] = &[
    "",
    "{",
    "[",
    "}",
    "null",
    "\"\"",
    "{}",
    "[]",
    "{\"a\":1,}",
    "\u{feff}{}",
    "{} {}",
    "{}\u{0}",
    "{'a': 1}",
    "{\"expected_version\": 1, \"expected_version\": 2}",
    "{\"name\": \"\\ud800\"}",
    "{\"name\": \"\\u0000\"}",
];

fn content_type() -> BoxedStrategy<Option<String>> {
    prop_oneof![
        2 => Just(None),
        4 => Just(Some("application/json".to_owned())),
        3 => select(
            vec![
                "application/json; charset=utf-8",
                "application/json; charset=latin1",
                "application/problem+json",
                "application/vnd.orderly+json",
                "text/plain",
                "text/json",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
                "application/octet-stream",
                "",
                "application/",
                "*/*",
                "APPLICATION/JSON",
            ]
        )
        .prop_map(|s| Some(s.to_owned())),
        1 => "[ -~]{0,40}".prop_map(Some),
    ]
    .boxed()
}

fn raw(e: Endpoint, p: &Pools) -> BoxedStrategy<Body> {
    let text = plausible(Mode::Loose, e, p).prop_map(|v| v.to_string().into_bytes());
    let bytes = prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..256),
        2 => select(RAW_TEXTS).prop_map(|s| s.as_bytes().to_vec()),
        // A plausible body with a number JSON allows but no i64 holds (or one it forbids).
        3 => (plausible(Mode::Loose, e, p), select(e.fields()), select(HUGE_NUMBERS)).prop_map(|(v, k, n)| {
            let rest = v.to_string();
            let rest = &rest[1..];
            let sep = if rest == "}" || rest.is_empty() { "" } else { "," };
            format!("{{\"{k}\": {n}{sep}{rest}").into_bytes()
        }),
        // A plausible body cut short, or with a byte changed.
        3 => (text, any::<Index>(), any::<u8>(), any::<bool>()).prop_map(|(mut b, at, byte, cut)| {
            if !b.is_empty() {
                let at = at.index(b.len());
                if cut {
                    b.truncate(at);
                } else {
                    b[at] = byte;
                }
            }
            b
        }),
        1 => select(vec![127usize, 129, 10_000]).prop_map(|depth| {
            let mut b = vec![b'['; depth];
            b.extend(std::iter::repeat_n(b']', depth));
            b
        }),
    ];
    (bytes, content_type())
        .prop_map(|(bytes, content_type)| Body::Raw { bytes, content_type })
        .boxed()
}

// ------------------------------------------------------------------ the world

/// What a case may change in the database. A non-2xx answer must leave it as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot(BTreeMap<&'static str, i64>);

impl Snapshot {
    fn differences(&self, after: &Snapshot) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, v)| after.0.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: {v} -> {}", after.0[k]))
            .collect()
    }
}

async fn snapshot(app: &TestApp) -> Snapshot {
    let mut m = BTreeMap::new();
    // One query per shard (not one per table): the snapshot is taken after every case.
    let shards = &app.raw;
    let per_shard = shards.all().iter().map(|shard| {
        let t = &shard.tables;
        let sql = format!(
            "SELECT (SELECT COUNT(*) FROM {o}), (SELECT COUNT(*) FROM {i}), \
             (SELECT COUNT(*) FROM {p}), (SELECT COUNT(*) FROM {d}), (SELECT COUNT(*) FROM {v}), \
             (SELECT CAST(COALESCE(SUM(version), 0) AS SIGNED) FROM {o})",
            o = t.orders,
            i = t.items,
            p = t.payments,
            d = t.discounts,
            v = t.voids
        );
        let pool = shards.primary(shard);
        async move {
            sqlx::query_as::<_, (i64, i64, i64, i64, i64, i64)>(AssertSqlSafe(sql))
                .fetch_one(pool)
                .await
                .expect("shard counts")
        }
    });
    let names = [
        "orders",
        "order_items",
        "order_payments",
        "order_discounts",
        "order_voids",
        "sum of order versions",
    ];
    for row in futures::future::join_all(per_shard).await {
        let row = [row.0, row.1, row.2, row.3, row.4, row.5];
        for (name, n) in names.iter().zip(row) {
            *m.entry(*name).or_insert(0) += n;
        }
    }
    let commerce: (i64, i64, i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM users), (SELECT COUNT(*) FROM shops), \
         (SELECT COUNT(*) FROM products), (SELECT COUNT(*) FROM coupons), \
         (SELECT COUNT(*) FROM order_claims), (SELECT COUNT(*) FROM stock_reservations), \
         (SELECT COUNT(*) FROM payment_numbers), \
         (SELECT CAST(COALESCE(SUM(stock), 0) AS SIGNED) FROM products), \
         (SELECT COUNT(*) FROM coupons WHERE redeemed_order_id IS NOT NULL)",
    )
    .fetch_one(&app.commerce)
    .await
    .expect("commerce counts");
    let commerce = [
        ("users", commerce.0),
        ("shops", commerce.1),
        ("products", commerce.2),
        ("coupons", commerce.3),
        ("order_claims", commerce.4),
        ("stock_reservations", commerce.5),
        ("payment_numbers", commerce.6),
        ("sum of stock", commerce.7),
        ("redeemed coupons", commerce.8),
    ];
    m.extend(commerce);
    Snapshot(m)
}

/// The state each real order is kept in: a case that moves one on gets it replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    Pending,
    Paid,
    Shipped,
    /// Pending, of the other user: only the admin may touch it.
    Others,
}

impl Kept {
    fn status(self) -> &'static str {
        match self {
            Kept::Pending | Kept::Others => "pending_payment",
            Kept::Paid => "paid",
            Kept::Shipped => "shipped",
        }
    }
}

const KEPT: [Kept; 7] = [
    Kept::Pending,
    Kept::Pending,
    Kept::Paid,
    Kept::Paid,
    Kept::Shipped,
    Kept::Shipped,
    Kept::Others,
];

#[derive(Default)]
struct Stats {
    requests: u64,
    answers: BTreeMap<String, BTreeMap<u16, u64>>,
}

struct World {
    app: TestApp,
    pools: Pools,
    shop: orderly::domain::ids::ShopId,
    other_shop: orderly::domain::ids::ShopId,
    /// The real orders, one per [`KEPT`] slot; replaced when a case moves one on.
    orders: Mutex<Vec<String>>,
    baseline: Mutex<Snapshot>,
    stats: Mutex<Stats>,
}

impl World {
    async fn set_up() -> World {
        // The sweeper confirms and voids claims on its own clock; a snapshot must change
        // only by the case just sent, so it stays asleep for the length of any run.
        let app = TestApp::spawn_with(|s| s.sweeper.interval_secs = 7 * 86_400).await;
        let cat = app.catalog(&[1_000_000, 1_000_000, 1_000_000]).await;
        let other = app.catalog(&[1_000_000]).await;
        let coupons = vec![
            app.coupon(OWNER, 100, 0).await,
            app.coupon(OWNER, 200, 5_000).await,
            app.coupon(OTHER_USER, 100, 0).await,
        ];
        let mut world = World {
            pools: Pools {
                products: [cat.products.clone(), other.products].concat(),
                shops: vec![cat.shop.to_string(), other.shop.to_string()],
                users: vec![OWNER.to_string(), OTHER_USER.to_string()],
                coupons,
                orders: Vec::new(),
            },
            shop: cat.shop,
            other_shop: other.shop,
            orders: Mutex::new(Vec::new()),
            baseline: Mutex::new(snapshot(&app).await),
            stats: Mutex::default(),
            app,
        };
        let mut orders = Vec::new();
        for kept in KEPT {
            orders.push(world.order_in(kept).await);
        }
        world.pools.orders = orders.clone();
        world.orders = Mutex::new(orders);
        let baseline = snapshot(&world.app).await;
        // The snapshot counts what the helpers count.
        for t in ["orders", "order_items", "order_payments", "order_discounts"] {
            assert_eq!(baseline.0[t], world.app.count_shard_rows(t).await, "{t}");
        }
        for t in ["users", "shops", "products", "coupons", "payment_numbers"] {
            assert_eq!(baseline.0[t], world.app.count_commerce_rows(t).await, "{t}");
        }
        world.baseline = Mutex::new(baseline);
        world
    }

    /// A new order in the state of `kept`, through the API.
    async fn order_in(&self, kept: Kept) -> String {
        let app = &self.app;
        let product = self.pools.products[0].as_str();
        let user = if kept == Kept::Others { OTHER_USER } else { OWNER };
        let order = app.place_order(user, &[(product, 1)]).await;
        let id = order["order_id"].as_str().unwrap().to_owned();
        if matches!(kept, Kept::Paid | Kept::Shipped) {
            let (s, paid) = app.pay(&order).await;
            assert!(s.is_success(), "{paid}");
            if kept == Kept::Shipped {
                let (s, shipped) = app
                    .call(
                        "POST",
                        &format!("/v1/orders/{id}/shipment"),
                        Some(&app.merchant_token(self.shop)),
                        Some(json!({"expected_version": paid["version"], "carrier": "SF", "tracking_number": "SF1"})),
                    )
                    .await;
                assert!(s.is_success(), "{shipped}");
            }
        }
        id
    }

    fn token(&self, endpoint: Endpoint, who: Who) -> Option<String> {
        let app = &self.app;
        let who = match (who, endpoint) {
            (Who::Right, Endpoint::Pay | Endpoint::Refund) => Who::Service,
            (Who::Right, Endpoint::Ship | Endpoint::Products | Endpoint::Stock) => Who::Merchant,
            // A merchant's coupon must name its shop; the admin's is any coupon.
            (Who::Right, Endpoint::Invalidate | Endpoint::Users | Endpoint::Shops | Endpoint::Coupons) => {
                Who::Admin
            }
            (Who::Right, _) => Who::Owner,
            (who, _) => who,
        };
        match who {
            Who::Right => unreachable!("resolved above"),
            Who::Owner => Some(app.user_token(OWNER)),
            Who::OtherUser => Some(app.user_token(OTHER_USER)),
            Who::Merchant => Some(app.merchant_token(self.shop)),
            Who::OtherMerchant => Some(app.merchant_token(self.other_shop)),
            Who::Service => Some(app.service_token()),
            Who::Admin => Some(app.admin_token()),
            Who::Nobody => None,
            Who::Forged => Some("not.a.jwt".into()),
        }
    }

    /// Sends `case`; `Err` only when no HTTP answer came back.
    async fn send(&self, case: &Case) -> Result<(reqwest::StatusCode, Option<String>, String), String> {
        let slot = match &case.id {
            PathId::Real(i) => Some(i.index(KEPT.len())),
            _ => None,
        };
        let id = match (&case.id, case.endpoint) {
            (PathId::Real(i), Endpoint::Stock) => {
                self.pools.products[i.index(self.pools.products.len())].clone()
            }
            (PathId::Real(_), _) => self.orders.lock().unwrap()[slot.unwrap()].clone(),
            (PathId::Digits(d), _) => d.clone(),
            (PathId::Odd(s), _) => (*s).to_owned(),
        };
        let app = &self.app;
        let mut req = app.client.request(
            case.endpoint.method().parse().unwrap(),
            format!("{}{}", app.base, case.endpoint.path(&id)),
        );
        if let Some(t) = self.token(case.endpoint, case.who) {
            req = req.bearer_auth(t);
        }
        req = match &case.body {
            Body::None => req,
            Body::Json(v) => {
                let mut text = v.to_string();
                if text.contains(FRESH_ORDER_ID) {
                    text = text.replace(FRESH_ORDER_ID, &app.new_order_id(OWNER).await);
                }
                req.header(CONTENT_TYPE, "application/json").body(text)
            }
            Body::Raw { bytes, content_type } => {
                let mut bytes = bytes.clone();
                let placeholder = FRESH_ORDER_ID.as_bytes();
                if let Some(at) = bytes.windows(placeholder.len()).position(|w| w == placeholder) {
                    let id = app.new_order_id(OWNER).await;
                    bytes.splice(at..at + placeholder.len(), id.bytes());
                }
                let req = req.body(bytes);
                match content_type {
                    Some(ct) => req.header(CONTENT_TYPE, ct),
                    None => req,
                }
            }
        };
        let resp = req.send().await.map_err(|e| format!("no answer: {e:?}"))?;
        let status = resp.status();
        let ct = resp
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let text = resp.text().await.map_err(|e| format!("answer cut off: {e:?}"))?;
        Ok((status, ct, text))
    }

    async fn check(&self, case: &Case) -> Result<(), TestCaseError> {
        let (status, ct, text) = self.send(case).await.map_err(TestCaseError::fail)?;
        {
            let mut stats = self.stats.lock().unwrap();
            stats.requests += 1;
            *stats
                .answers
                .entry(format!("{:?}", case.endpoint))
                .or_default()
                .entry(status.as_u16())
                .or_default() += 1;
        }
        let answer = || format!("{status} {ct:?} {}", truncate(&text));
        prop_assert!(!status.is_server_error(), "a 5xx: {}", answer());
        let after = snapshot(&self.app).await;
        if status.is_success() {
            let created: Value = serde_json::from_str(&text)
                .map_err(|e| TestCaseError::fail(format!("a 2xx that is not JSON ({e}): {}", answer())))?;
            *self.baseline.lock().unwrap() = after;
            if let Err(why) = self.read_back(case.endpoint, &created).await {
                return Err(TestCaseError::fail(format!("{} then {why}", answer())));
            }
            if case.endpoint.on_an_order() {
                self.replace_moved_orders().await;
            }
            return Ok(());
        }
        let before = std::mem::replace(&mut *self.baseline.lock().unwrap(), after.clone());
        let written = before.differences(&after);
        prop_assert!(written.is_empty(), "{} wrote: {written:?}", answer());
        prop_assert_eq!(ct.as_deref(), Some("application/problem+json"), "{}", answer());
        let problem: Value = serde_json::from_str(&text)
            .map_err(|e| TestCaseError::fail(format!("a problem that is not JSON ({e}): {}", answer())))?;
        prop_assert!(
            problem["code"].is_string(),
            "a problem without a code: {}",
            answer()
        );
        prop_assert_eq!(
            problem["status"].as_u64(),
            Some(u64::from(status.as_u16())),
            "{}",
            answer()
        );
        Ok(())
    }

    /// Reads what a 2xx wrote through the API: whatever a request could store, the service
    /// must be able to read back (a value the database took differently than meant, like a
    /// leap second stored as the zero date, answers 500 on every later read).
    async fn read_back(&self, endpoint: Endpoint, written: &Value) -> Result<(), String> {
        let app = &self.app;
        let admin = app.admin_token();
        let id = |k: &str| written[k].as_str().unwrap_or_default().to_owned();
        let (method, path, token, body) = match endpoint {
            Endpoint::Users => ("GET", format!("/v1/users/{}", id("user_id")), admin, None),
            Endpoint::Products | Endpoint::Stock => {
                ("GET", format!("/v1/products/{}", id("product_id")), admin, None)
            }
            // Pricing loads the coupon, whoever it was issued to.
            Endpoint::Coupons => (
                "POST",
                "/v1/orders/preview".to_owned(),
                app.user_token(OWNER),
                Some(json!({
                    "items": [{"product_id": self.pools.products[0], "quantity": 1}],
                    "coupon_ids": [id("coupon_id")],
                })),
            ),
            e if e == Endpoint::Create || e.on_an_order() => {
                ("GET", format!("/v1/orders/{}", id("order_id")), admin, None)
            }
            Endpoint::OrderIds | Endpoint::Preview | Endpoint::Shops => return Ok(()),
            e => unreachable!("{e:?} is on an order"),
        };
        let (s, answer) = app.call(method, &path, Some(&token), body).await;
        if s.is_server_error() {
            return Err(format!("reading it back ({method} {path}) answered {s} {answer}"));
        }
        Ok(())
    }

    /// Replaces every real order no longer in its slot's state, and takes a new baseline.
    async fn replace_moved_orders(&self) {
        let current = self.orders.lock().unwrap().clone();
        let admin = self.app.admin_token();
        let mut replaced = false;
        for (slot, id) in current.iter().enumerate() {
            let (s, order) = self
                .app
                .call("GET", &format!("/v1/orders/{id}"), Some(&admin), None)
                .await;
            assert!(s.is_success(), "{order}");
            if order["status"] != KEPT[slot].status() {
                let fresh = self.order_in(KEPT[slot]).await;
                self.orders.lock().unwrap()[slot] = fresh;
                replaced = true;
            }
        }
        if replaced {
            *self.baseline.lock().unwrap() = snapshot(&self.app).await;
        }
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(300) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
