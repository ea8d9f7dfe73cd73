//! Pure hot paths: id generation, shard routing, request validation, order JSON encoding.
//! Run with `cargo bench`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use orderly::domain::ids::{IdGenerator, UserId, WorkerId};
use orderly::domain::order::{Address, CreateOrderRequest, LineRequest, NewOrder};
use orderly::domain::shard::ShardCount;

fn ids(c: &mut Criterion) {
    let gen = IdGenerator::new(WorkerId::new(1).unwrap());
    let mut g = c.benchmark_group("ids");
    g.throughput(Throughput::Elements(1));
    let mut u = 0i64;
    g.bench_function("next_for", |b| {
        b.iter(|| {
            u = u % 1_000_000 + 1;
            black_box(gen.next_for(UserId::new(u).unwrap()).unwrap())
        })
    });
    let shards = ShardCount::new(32).unwrap();
    g.bench_function("shard_of_user", |b| {
        b.iter(|| {
            u = u % 1_000_000 + 1;
            black_box(shards.shard_of_user(UserId::new(u).unwrap()))
        })
    });
    g.finish();
}

fn validation(c: &mut Criterion) {
    let user = UserId::new(77).unwrap();
    let id = IdGenerator::new(WorkerId::new(1).unwrap())
        .next_for(user)
        .unwrap();
    let req = CreateOrderRequest {
        order_id: id.to_string(),
        items: (1..=10)
            .map(|p| LineRequest {
                product_id: p.to_string(),
                quantity: 2,
            })
            .collect(),
        from_cart: false,
        coupon_ids: vec!["5".into()],
        address: Address {
            name: "Li Lei".into(),
            phone: "13800000000".into(),
            region: "Shanghai".into(),
            detail: "1 Century Avenue".into(),
        },
        remark: "leave at the door".into(),
    };
    let body = serde_json::json!({
        "order_id": id.to_string(),
        "items": (1..=10).map(|p| serde_json::json!({"product_id": p.to_string(), "quantity": 2})).collect::<Vec<_>>(),
        "coupon_ids": ["5"],
        "address": {"name": "Li Lei", "phone": "13800000000", "region": "Shanghai", "detail": "1 Century Avenue"},
        "remark": "leave at the door"
    })
    .to_string();
    c.bench_function("parse_and_validate_create_10_lines", |b| {
        b.iter(|| {
            let req: CreateOrderRequest = serde_json::from_str(black_box(&body)).unwrap();
            black_box(NewOrder::parse(user, req).unwrap())
        })
    });
    c.bench_function("request_hash_10_lines", |b| {
        let order = NewOrder::parse(user, req.clone()).unwrap();
        b.iter(|| black_box(order.request_hash()))
    });
}

fn encoding(c: &mut Criterion) {
    use chrono::Utc;
    use orderly::domain::ids::{ProductId, ShopId};
    use orderly::domain::money::{Currency, Money};
    use orderly::domain::order::{price_order, NewLine, Order, ProductSnapshot};
    use orderly::http::orders::OrderView;
    let user = UserId::new(77).unwrap();
    let id = IdGenerator::new(WorkerId::new(1).unwrap())
        .next_for(user)
        .unwrap();
    let products: Vec<ProductSnapshot> = (1..=10)
        .map(|p| ProductSnapshot {
            id: ProductId::new(p).unwrap(),
            shop_id: ShopId::new(1).unwrap(),
            name: format!("product number {p}"),
            price: Money::new(1999 * p).unwrap(),
            currency: Currency::CNY,
        })
        .collect();
    let lines: Vec<NewLine> = products
        .iter()
        .map(|p| NewLine {
            product_id: p.id,
            quantity: 2,
        })
        .collect();
    let new = NewOrder {
        order_id: id,
        user_id: user,
        lines: lines.clone(),
        coupon_ids: vec![],
        address: Address {
            name: "Li Lei".into(),
            phone: "13800000000".into(),
            region: "Shanghai".into(),
            detail: "1 Century Avenue".into(),
        },
        remark: String::new(),
    };
    let pricing = price_order(user, Some(id), &lines, &[], &products, &[], Utc::now()).unwrap();
    let now = Utc::now();
    let order = Order::from_new(&new, pricing, now, now);
    c.bench_function("encode_order_json_10_lines", |b| {
        b.iter(|| black_box(serde_json::to_vec(&OrderView::from(black_box(&order))).unwrap()))
    });
    c.bench_function("price_order_10_lines", |b| {
        b.iter(|| black_box(price_order(user, Some(id), &lines, &[], &products, &[], now).unwrap()))
    });
}

criterion_group!(benches, ids, validation, encoding);
criterion_main!(benches);
