//! CPU cost of the store's write path per put, without raft or the network: batches of puts
//! with random keys, as a member applies them under many clients. Then the cost of single-key
//! reads at an older revision (half-way back), which walk each key's history chain.
//!
//! `cargo run --release -p keyhold-store --example put_cost -- [puts] [key space] [batch]`

use std::time::Instant;

use keyhold_store::{KvStore, PutRequest, RangeRequest, StoreOptions, WriteRequest};

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>().expect("a number"));
    let puts = args.next().unwrap_or(400_000);
    let key_space = args.next().unwrap_or(100_000);
    let batch = args.next().unwrap_or(32).max(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = KvStore::open(dir.path(), StoreOptions::default()).expect("open");
    // A fixed xorshift sequence, so runs compare the same keys.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_key = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        format!("{:08}", x % key_space as u64).into_bytes()
    };
    let value = vec![b'v'; 256];
    let start = Instant::now();
    let mut done = 0;
    while done < puts {
        let mut w = store.write_batch(0).expect("batch");
        for _ in 0..batch.min(puts - done) {
            let req = WriteRequest::Put(PutRequest {
                key: next_key(),
                value: value.clone(),
                ..PutRequest::default()
            });
            w.apply(&req).expect("put");
            done += 1;
        }
        w.commit(&[]).expect("commit");
    }
    let took = start.elapsed();
    println!(
        "{puts} puts, {key_space} keys, batches of {batch}: {:.2} µs per put",
        took.as_secs_f64() * 1e6 / puts as f64
    );
    let revision = store.current_revision().expect("revision") / 2;
    let reads = 10_000;
    let start = Instant::now();
    let mut found = 0;
    for _ in 0..reads {
        let req = RangeRequest {
            key: next_key(),
            revision,
            ..RangeRequest::default()
        };
        found += store.range(&req).expect("range").kvs.len();
    }
    println!(
        "{reads} reads at revision {revision} ({found} found): {:.2} µs per read",
        start.elapsed().as_secs_f64() * 1e6 / reads as f64
    );
}
