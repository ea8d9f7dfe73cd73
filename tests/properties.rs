//! Property tests of the pure domain: id encoding, shard routing, the status machine.

use std::collections::HashSet;
use std::sync::Arc;

use orderly::domain::ids::{IdGenerator, IdParts, OrderId, UserId, WorkerId, EPOCH_MS};
use orderly::domain::shard::{Gene, ShardCount};
use orderly::domain::status::{transition, Command, OrderStatus};
use proptest::prelude::*;

fn user(u: i64) -> UserId {
    UserId::new(u).unwrap()
}

#[test]
fn ids_are_unique_across_threads() {
    let gen = Arc::new(IdGenerator::new(WorkerId::new(5).unwrap()));
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let gen = gen.clone();
            std::thread::spawn(move || {
                (0..50_000)
                    .map(|i| gen.next_for(user(1 + (i % 7) + t)).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all = HashSet::new();
    for h in handles {
        for id in h.join().unwrap() {
            assert!(all.insert(id), "duplicate id {id}");
        }
    }
    assert_eq!(all.len(), 200_000);
}

#[test]
fn ids_are_monotonic_per_process() {
    // Per user the ids strictly increase; across users the (time, sequence) slot does.
    let gen = IdGenerator::new(WorkerId::new(9).unwrap());
    let mut last_slot = (0i64, 0u16);
    let mut last_for_user = std::collections::HashMap::new();
    for i in 0..100_000i64 {
        let u = user(1 + i % 13);
        let id = gen.next_for(u).unwrap();
        let p = id.parts();
        let slot = (p.unix_ms, p.seq);
        assert!(slot > last_slot, "{slot:?} after {last_slot:?}");
        last_slot = slot;
        if let Some(prev) = last_for_user.insert(u, id) {
            assert!(id > prev);
        }
    }
}

#[test]
fn two_workers_never_collide() {
    let a = IdGenerator::new(WorkerId::new(1).unwrap());
    let b = IdGenerator::new(WorkerId::new(2).unwrap());
    let mut seen = HashSet::new();
    for _ in 0..20_000 {
        assert!(seen.insert(a.next_for(user(42)).unwrap()));
        assert!(seen.insert(b.next_for(user(42)).unwrap()));
    }
}

proptest! {
    #[test]
    fn id_parts_round_trip(ms in 0i64..(1i64 << 40), gene in 0u64..1024, worker in 0u16..64, seq in 0u16..128) {
        let parts = IdParts { unix_ms: EPOCH_MS + ms, gene: gene_of(gene), worker, seq };
        let id = OrderId::compose(parts);
        prop_assert!(id.get() > 0 || (ms == 0 && gene == 0 && worker == 0 && seq == 0));
        prop_assert_eq!(id.parts(), parts);
        prop_assert_eq!(OrderId::parse(&id.to_string()).map(|i| i.parts()), OrderId::new(id.get()).map(|i| i.parts()));
    }

    #[test]
    fn gene_of_an_order_id_is_the_shard_of_its_user(u in 1i64..i64::MAX, log_n in 0u32..=10) {
        let gen = IdGenerator::new(WorkerId::new(3).unwrap());
        let id = gen.next_for(user(u)).unwrap();
        prop_assert_eq!(id.gene(), Gene::of_user(user(u)));
        let n = ShardCount::new(1 << log_n).unwrap();
        prop_assert_eq!(n.shard_of_gene(id.gene()), n.shard_of_user(user(u)));
    }

    #[test]
    fn doubling_shards_never_moves_an_order_elsewhere(u in 1i64..i64::MAX, log_n in 0u32..10) {
        let n = ShardCount::new(1 << log_n).unwrap();
        let n2 = ShardCount::new(2 << log_n).unwrap();
        let a = n.shard_of_user(user(u)).get();
        let b = n2.shard_of_user(user(u)).get();
        prop_assert!(b == a || u32::from(b) == u32::from(a) + n.get());
    }

    #[test]
    fn ids_after_a_time_bound_are_above_it(ms in 1i64..(1i64 << 39), gene in 0u64..1024, worker in 0u16..64, seq in 0u16..128) {
        let parts = IdParts { unix_ms: EPOCH_MS + ms, gene: gene_of(gene), worker, seq };
        let id = OrderId::compose(parts);
        let at = id.created_at();
        prop_assert!(id.get() >= OrderId::lower_bound_at(at));
        prop_assert!(id.get() < OrderId::lower_bound_at(at + chrono::Duration::milliseconds(1)));
    }

    #[test]
    fn status_walks_only_along_allowed_moves(cmds in proptest::collection::vec(0usize..Command::ALL.len(), 0..20)) {
        let mut status = OrderStatus::PendingPayment;
        for c in cmds {
            let cmd = Command::ALL[c];
            match transition(status, cmd) {
                Ok(next) => {
                    prop_assert!(!status.is_final(), "moved out of final {status:?}");
                    prop_assert_ne!(next, status);
                    status = next;
                }
                Err(e) => prop_assert_eq!(e.from, status),
            }
        }
        // Whatever happened, a closed or invalid order can never be paid.
        if status.releases_stock() {
            prop_assert!(transition(status, Command::Pay).is_err());
        }
    }
}

fn gene_of(bits: u64) -> Gene {
    Gene::new(bits as u16).unwrap()
}
