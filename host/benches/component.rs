//! The component's own cost: parse, validate and route a message inside the
//! component (the plug-in world, through wasmtime) against the same guest
//! logic compiled natively. Also each of those calls alone, next to a call
//! that does almost nothing (the floor of crossing into the component), and
//! the cost of a fresh instance per message.
//!
//!     cargo bench -p mailroot --bench component
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mailroot::plugin::Plugin;
use mailroot::plugin::bindings::mailroot::relay::types::{
    Limits, MxAnswer, MxRecord, RetryIntervals, RetrySchedule,
};
use mailroot_guest::{message, retry, route, validate};

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

/// The sizes measured: a typical message, a large one, and one at the top of
/// what is usually relayed.
const SIZES: [usize; 3] = [4 << 10, 64 << 10, 1 << 20];

/// Everything both sides of a measurement need.
struct Work {
    plugin: Plugin,
    wit_answer: MxAnswer,
    native_answer: route::MxAnswer,
}

impl Work {
    fn new() -> Self {
        let (wit_answer, native_answer) = mx_answer();
        Work {
            plugin: Plugin::load(mailroot::PLUGIN_COMPONENT).unwrap(),
            wit_answer,
            native_answer,
        }
    }

    /// Parse, validate and route `raw` inside the component.
    fn in_component(&mut self, raw: &[u8]) {
        let limits = Limits {
            max_message_bytes: 10 << 20,
            max_recipients: 1000,
        };
        let summary = self.plugin.parse(raw).unwrap().unwrap();
        let findings = self.plugin.validate(raw, limits).unwrap();
        let plan = self
            .plugin
            .plan_delivery("d1.test", &self.wit_answer, 7)
            .unwrap()
            .unwrap();
        black_box((summary, findings, plan));
    }

    /// The same with the guest code compiled natively.
    fn native(&self, raw: &[u8]) {
        let summary = message::summarize(raw).unwrap();
        let findings = validate::validate(raw, &validate::Limits::default());
        let plan = route::plan_delivery("d1.test", &self.native_answer, 7).unwrap();
        black_box((summary, findings, plan));
    }
}

fn parse_validate_route(c: &mut Criterion) {
    let mut work = Work::new();
    let mut group = c.benchmark_group("parse+validate+route");
    for size in SIZES {
        let raw = message_of(size);
        group.throughput(Throughput::Bytes(raw.len() as u64));
        group.bench_with_input(BenchmarkId::new("component", size), &raw, |b, raw| {
            b.iter(|| work.in_component(raw))
        });
        group.bench_with_input(BenchmarkId::new("native", size), &raw, |b, raw| {
            b.iter(|| work.native(raw))
        });
    }
    group.finish();
}

/// The ratio of component to native, measured side by side: short batches of
/// each in turn, so that both see the same machine (a shared 2-core VM drifts
/// by 20% between criterion's back-to-back runs). Prints the medians of the
/// batches and the median of the per-round ratios.
///
/// Runs with no filter, or with the filter `side-by-side`.
fn side_by_side(_: &mut Criterion) {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter.is_some_and(|f| f != "side-by-side") {
        return;
    }
    const ROUNDS: usize = 41;
    const BATCH: std::time::Duration = std::time::Duration::from_millis(20);
    let mut work = Work::new();
    println!("side by side: parse + validate + route, {ROUNDS} rounds of {BATCH:?} batches");
    println!(
        "{:>9} {:>14} {:>12} {:>6}",
        "size", "component µs", "native µs", "ratio"
    );
    for size in SIZES {
        let raw = message_of(size);
        // One timed run sizes the batches.
        let start = std::time::Instant::now();
        work.in_component(&raw);
        let per_batch = (BATCH.as_nanos() / start.elapsed().as_nanos().max(1)).max(1) as u32;
        let batch = |run: &mut dyn FnMut()| {
            let start = std::time::Instant::now();
            for _ in 0..per_batch {
                run();
            }
            start.elapsed().as_secs_f64() * 1e6 / f64::from(per_batch)
        };
        let (mut component, mut native, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..=ROUNDS {
            let c = batch(&mut || work.in_component(&raw));
            let n = batch(&mut || work.native(&raw));
            // The first round warms both up.
            if round > 0 {
                component.push(c);
                native.push(n);
                ratios.push(c / n);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "{size:>9} {:>14.2} {:>12.2} {:>6.2}",
            median(&mut component),
            median(&mut native),
            median(&mut ratios)
        );
    }
}

/// Each call of the 4 KB benchmark alone, and `plan-retry`, whose arguments
/// and result are a few numbers: what any call into the component costs
/// before it does any work.
fn each_call(c: &mut Criterion) {
    let engine = wasmtime::Engine::default();
    let component =
        wasmtime::component::Component::new(&engine, mailroot::PLUGIN_COMPONENT).unwrap();
    let mut linker = wasmtime::component::Linker::<State>::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).unwrap();
    let mut store = wasmtime::Store::new(&engine, State::default());
    let plugin =
        mailroot::plugin::bindings::Plugin::instantiate(&mut store, &component, &linker).unwrap();
    let logic = plugin.mailroot_relay_mail_logic();
    let (wit_answer, native_answer) = mx_answer();
    let limits = Limits {
        max_message_bytes: 10 << 20,
        max_recipients: 1000,
    };
    let raw = message_of(4 << 10);
    let wit_schedule = RetrySchedule {
        intervals: RetryIntervals::Doubling((300, 4000)),
        delay_notice_after: None,
        give_up_after: 432_000,
    };
    // The same schedule: Postfix's.
    let native_schedule = retry::Schedule::postfix();

    let mut group = c.benchmark_group("each call, 4 KB");
    group.bench_function("component/parse", |b| {
        b.iter(|| black_box(logic.call_parse(&mut store, &raw).unwrap().unwrap()))
    });
    group.bench_function("native/parse", |b| {
        b.iter(|| black_box(message::summarize(&raw).unwrap()))
    });
    group.bench_function("component/validate", |b| {
        b.iter(|| black_box(logic.call_validate(&mut store, &raw, limits).unwrap()))
    });
    group.bench_function("native/validate", |b| {
        b.iter(|| black_box(validate::validate(&raw, &validate::Limits::default())))
    });
    group.bench_function("component/plan-delivery", |b| {
        b.iter(|| {
            black_box(
                logic
                    .call_plan_delivery(&mut store, "d1.test", &wit_answer, 7)
                    .unwrap()
                    .unwrap(),
            )
        })
    });
    group.bench_function("native/plan-delivery", |b| {
        b.iter(|| black_box(route::plan_delivery("d1.test", &native_answer, 7).unwrap()))
    });
    group.bench_function("component/plan-retry", |b| {
        b.iter(|| {
            black_box(
                logic
                    .call_plan_retry(&mut store, &wit_schedule, 2, 0, 1_000, false)
                    .unwrap(),
            )
        })
    });
    group.bench_function("native/plan-retry", |b| {
        b.iter(|| black_box(native_schedule.decide(2, 0, 1_000, false)))
    });
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

criterion_group!(
    benches,
    parse_validate_route,
    each_call,
    instantiate,
    side_by_side
);
criterion_main!(benches);
