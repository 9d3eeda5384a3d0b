//! The component's own cost: parse, validate and route a message inside the
//! component (the plug-in world, through wasmtime) against the same guest
//! logic compiled natively. Also the cost of a fresh instance per message.
//!
//!     cargo bench -p mailroot --bench component
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mailroot::plugin::Plugin;
use mailroot::plugin::bindings::mailroot::relay::types::{Limits, MxAnswer, MxRecord};
use mailroot_guest::{message, route, validate};

/// A message of about `size` bytes: headers, then 76-character lines.
fn message_of(size: usize) -> Vec<u8> {
    let mut m = b"x-sender: bench@src.test\r\nx-receiver: r1@d1.test\r\nFrom: Bench <bench@src.test>\r\nTo: r1@d1.test\r\nSubject: benchmark\r\nDate: Thu, 03 Dec 2026 18:00:00 +0000\r\nMessage-ID: <b@src.test>\r\n\r\n".to_vec();
    let line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqr\r\n";
    while m.len() < size {
        m.extend_from_slice(line);
    }
    m
}

fn mx_answer() -> (MxAnswer, route::MxAnswer) {
    let records = [
        (10, "mx1.d1.test."),
        (20, "mx2.d1.test."),
        (10, "mx3.d1.test."),
    ];
    (
        MxAnswer::Records(
            records
                .iter()
                .map(|(p, e)| MxRecord {
                    preference: *p,
                    exchange: e.to_string(),
                })
                .collect(),
        ),
        route::MxAnswer::Records(
            records
                .iter()
                .map(|(p, e)| route::MxRecord {
                    preference: *p,
                    exchange: e.to_string(),
                })
                .collect(),
        ),
    )
}

fn parse_validate_route(c: &mut Criterion) {
    let mut plugin = Plugin::load(mailroot::PLUGIN_COMPONENT).unwrap();
    let (wit_answer, native_answer) = mx_answer();
    let limits = Limits {
        max_message_bytes: 10 << 20,
        max_recipients: 1000,
    };
    let mut group = c.benchmark_group("parse+validate+route");
    for size in [4 << 10, 64 << 10, 1 << 20] {
        let raw = message_of(size);
        group.throughput(Throughput::Bytes(raw.len() as u64));
        group.bench_with_input(BenchmarkId::new("component", size), &raw, |b, raw| {
            b.iter(|| {
                let summary = plugin.parse(raw).unwrap().unwrap();
                let findings = plugin.validate(raw, limits).unwrap();
                let plan = plugin
                    .plan_delivery("d1.test", &wit_answer, 7)
                    .unwrap()
                    .unwrap();
                black_box((summary, findings, plan));
            })
        });
        group.bench_with_input(BenchmarkId::new("native", size), &raw, |b, raw| {
            b.iter(|| {
                let summary = message::summarize(raw).unwrap();
                let findings = validate::validate(raw, &validate::Limits::default());
                let plan = route::plan_delivery("d1.test", &native_answer, 7).unwrap();
                black_box((summary, findings, plan));
            })
        });
    }
    group.finish();
}

fn instantiate(c: &mut Criterion) {
    // The relay's setting (memory kept resident, decommits batched: fewer
    // TLB shootdowns across its threads) and wasmtime's default (each
    // instance's memory decommitted as it goes).
    for (name, keep_resident, decommit_batch) in [
        ("relay pool: 2 MiB resident", 2 << 20, 64),
        ("pool: decommit at once", 0, 1),
    ] {
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.total_component_instances(4)
            .total_core_instances(32)
            .total_memories(8)
            .total_tables(16)
            .max_memory_size(256 << 20)
            .linear_memory_keep_resident(keep_resident)
            .decommit_batch_size(decommit_batch);
        let mut config = wasmtime::Config::new();
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        config.memory_init_cow(true);
        let engine = wasmtime::Engine::new(&config).unwrap();
        let component =
            wasmtime::component::Component::new(&engine, mailroot::PLUGIN_COMPONENT).unwrap();
        let mut linker = wasmtime::component::Linker::<State>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).unwrap();
        let pre = linker.instantiate_pre(&component).unwrap();
        c.bench_function(&format!("instantiate plug-in (InstancePre, {name})"), |b| {
            b.iter(|| {
                let mut store = wasmtime::Store::new(&engine, State::default());
                black_box(pre.instantiate(&mut store).unwrap());
            })
        });
    }
}

struct State {
    wasi: wasmtime_wasi::WasiCtx,
    table: wasmtime::component::ResourceTable,
}

impl Default for State {
    fn default() -> Self {
        State {
            wasi: wasmtime_wasi::WasiCtx::builder().build(),
            table: wasmtime::component::ResourceTable::new(),
        }
    }
}

impl wasmtime_wasi::WasiView for State {
    fn ctx(&mut self) -> wasmtime_wasi::WasiCtxView<'_> {
        wasmtime_wasi::WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

criterion_group!(benches, parse_validate_route, instantiate);
criterion_main!(benches);
