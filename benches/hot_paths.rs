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

criterion_group!(benches, ids, validation);
criterion_main!(benches);
