//! Which codec the cache uses: JSON vs MessagePack vs postcard on a realistic order (3 lines,
//! 1 payment, 1 discount, an address in Chinese), by encoded size and by the time of one
//! encode + decode of the cache record. Run with `cargo bench --bench cache_codec`; the
//! figures are copied into the `redis::cache::codec` module docs.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use orderly::redis::cache::codec::{decode_order, encode_order, sample_order, OrderRecord};

fn record() -> OrderRecord {
    OrderRecord::from(&sample_order(123_456_789_012_345, 987_654, 3))
}

type Codec = (
    &'static str,
    fn(&OrderRecord) -> Vec<u8>,
    fn(&[u8]) -> OrderRecord,
);

fn codecs() -> Vec<Codec> {
    vec![
        (
            "json",
            |r| serde_json::to_vec(r).unwrap(),
            |b| serde_json::from_slice(b).unwrap(),
        ),
        (
            "msgpack_named",
            |r| rmp_serde::to_vec_named(r).unwrap(),
            |b| rmp_serde::from_slice(b).unwrap(),
        ),
        (
            "msgpack_compact",
            |r| rmp_serde::to_vec(r).unwrap(),
            |b| rmp_serde::from_slice(b).unwrap(),
        ),
        (
            "postcard",
            |r| postcard::to_stdvec(r).unwrap(),
            |b| postcard::from_bytes(b).unwrap(),
        ),
    ]
}

fn codec(c: &mut Criterion) {
    let r = record();
    let mut g = c.benchmark_group("cache_codec");
    for (name, enc, dec) in codecs() {
        let bytes = enc(&r);
        assert_eq!(dec(&bytes), r, "{name} does not round-trip");
        println!("cache_codec/{name}: {} bytes", bytes.len());
        g.bench_function(name, |b| b.iter(|| black_box(dec(&enc(black_box(&r))))));
    }
    // What the cache really does: domain order -> record -> bytes and back.
    let order = sample_order(123_456_789_012_345, 987_654, 3);
    println!(
        "cache_codec/chosen: {} bytes with the format byte",
        encode_order(&order).len()
    );
    g.bench_function("chosen_from_domain", |b| {
        b.iter(|| black_box(decode_order(&encode_order(black_box(&order)))))
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
