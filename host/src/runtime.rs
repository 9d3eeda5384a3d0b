//! Loading and calling the relay component under limits.
//!
//! One [`Engine`], one [`Linker`] and one pre-instantiated component are
//! shared by every worker; each call gets a fresh [`Store`] and instance, so
//! messages are isolated and linear memory never grows across messages.
//!
//! Every call runs under a memory cap ([`StoreLimits`]) and a CPU deadline
//! (epoch interruption). Epochs tick on wall-clock time, also while the guest
//! waits in a blocking import (a DNS query, a slow SMTP server), so the
//! deadline callback subtracts the time spent in imports ([`HostState::blocking`])
//! and only traps when the guest's own execution exceeds the budget.

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits,
    StoreLimitsBuilder, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::clock::Clock;
use crate::dns::Resolver;
use crate::mailroot::Mailroot;
use crate::sockets::TlsSettings;

/// Bindings of the `relay` world.
pub mod bindings {
    wasmtime::component::bindgen!({
        world: "relay",
        path: "../wit",
        with: {
            "mailroot:relay/smtp-socket.connection": crate::sockets::Connection,
        },
    });
}

use bindings::exports::mailroot::relay::stages;
use bindings::mailroot::relay::types::QueuedMessage;

use crate::delivery::Recorder;

/// How often the epoch advances; the CPU deadline is checked at this grain.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Limits on one component call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComponentLimits {
    /// Most linear memory one instance may use, in bytes.
    pub memory_bytes: usize,
    /// Most CPU time one call may spend in the guest itself.
    pub cpu: Duration,
    /// Instances alive at once (the pooling allocator's slots): the workers,
    /// plus a few for start-up and `check`.
    pub instances: usize,
}

impl Default for ComponentLimits {
    /// 256 MiB holds a 10 MiB message several times over; 10 s of CPU is far
    /// beyond what parsing and routing the largest message takes (about 60 ms).
    fn default() -> Self {
        ComponentLimits {
            memory_bytes: 256 << 20,
            cpu: Duration::from_secs(10),
            instances: 108,
        }
    }
}

/// The capabilities shared by every store: folders, DNS, TLS, clock.
#[derive(Clone)]
pub struct Capabilities {
    pub mailroot: Mailroot,
    pub resolver: Arc<Resolver>,
    pub tls: TlsSettings,
    pub clock: Arc<dyn Clock>,
    /// Most bytes the component may read from one file.
    pub max_read_bytes: u64,
}

/// The data of one store: WASI (empty), the resource table, limits, and the
/// capabilities the imports use.
pub struct HostState {
    wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    limits: StoreLimits,
    pub(crate) mailroot: Mailroot,
    pub(crate) resolver: Arc<Resolver>,
    pub(crate) tls: TlsSettings,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) max_read_bytes: u64,
    pub(crate) sockets: crate::sockets::Sockets,
    /// Stores delivery reports during a `deliver` call. Private: only
    /// [`Runtime::deliver`] puts it in and takes it out again.
    recorder: Option<Recorder>,
    /// What the log lines of this call are about (a queue id).
    pub(crate) log_context: String,
    call_started: Instant,
    in_imports: Duration,
}

impl HostState {
    /// The recorder of the `deliver` call under way, if this is one.
    pub(crate) fn recorder(&self) -> Option<&Recorder> {
        self.recorder.as_ref()
    }

    /// The same, to record reports and hand over more messages.
    pub(crate) fn recorder_mut(&mut self) -> Option<&mut Recorder> {
        self.recorder.as_mut()
    }

    /// Run a blocking import: its time does not count against the CPU budget.
    pub(crate) fn blocking<R>(&mut self, work: impl FnOnce(&mut Self) -> R) -> R {
        let started = Instant::now();
        let result = work(self);
        self.in_imports += started.elapsed();
        result
    }

    fn guest_time(&self) -> Duration {
        self.call_started.elapsed().saturating_sub(self.in_imports)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Why a component call did not return a value.
#[derive(Debug)]
pub enum CallError {
    /// The guest used more CPU time than allowed.
    CpuLimit(Duration),
    /// The guest trapped: a bug, or the memory cap was hit.
    Trap(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::CpuLimit(limit) => write!(
                f,
                "the component used more than {limit:?} of CPU time and was stopped"
            ),
            CallError::Trap(why) => write!(f, "the component trapped: {why}"),
        }
    }
}

/// Marker error of the deadline callback, to tell a CPU stop from other traps.
#[derive(Debug)]
struct CpuExhausted;

impl std::fmt::Display for CpuExhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CPU budget exhausted")
    }
}

impl std::error::Error for CpuExhausted {}

/// The relay component, compiled once and instantiated per call.
pub struct Runtime {
    engine: Engine,
    pre: bindings::RelayPre<HostState>,
    capabilities: Capabilities,
    limits: ComponentLimits,
}

impl Runtime {
    /// Compile `component` (a relay-world component) and link the imports.
    pub fn new(
        component: &[u8],
        capabilities: Capabilities,
        limits: ComponentLimits,
        cache_dir: Option<&Path>,
    ) -> wasmtime::Result<Self> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        // A pool of instance slots, reused from message to message: a fresh
        // instance per call costs microseconds, and linear memory starts from
        // a copy-on-write image.
        let slots = u32::try_from(limits.instances).unwrap_or(u32::MAX).max(1);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(8))
            .total_memories(slots.saturating_mul(2))
            .total_tables(slots.saturating_mul(4))
            .max_memory_size(limits.memory_bytes)
            // Reset small instances with memset and batch the madvise calls:
            // each madvise forces a TLB shootdown on every CPU (perf showed it).
            .linear_memory_keep_resident(2 << 20)
            .table_keep_resident(64 << 10)
            .decommit_batch_size(64);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        config.memory_init_cow(true);
        let engine = Engine::new(&config)?;
        let component = compile(&engine, component, cache_dir)?;
        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        bindings::Relay::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| {
            state
        })?;
        let pre = bindings::RelayPre::new(linker.instantiate_pre(&component)?)?;
        start_epoch_ticker(&engine);
        Ok(Runtime {
            engine,
            pre,
            capabilities,
            limits,
        })
    }

    /// The shared capabilities.
    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn instantiate(
        &self,
        log_context: &str,
    ) -> wasmtime::Result<(Store<HostState>, bindings::Relay)> {
        let caps = &self.capabilities;
        let state = HostState {
            // No preopened directories, no sockets, no environment: the
            // component reaches the world only through the mailroot imports.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(self.limits.memory_bytes)
                .trap_on_grow_failure(true)
                .build(),
            mailroot: caps.mailroot.clone(),
            resolver: caps.resolver.clone(),
            tls: caps.tls.clone(),
            clock: caps.clock.clone(),
            max_read_bytes: caps.max_read_bytes,
            sockets: Default::default(),
            recorder: None,
            log_context: log_context.to_string(),
            call_started: Instant::now(),
            in_imports: Duration::ZERO,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        let cpu = self.limits.cpu;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |ctx| {
            if ctx.data().guest_time() > cpu {
                return Err(wasmtime::Error::new(CpuExhausted));
            }
            Ok(UpdateDeadline::Continue(1))
        });
        let relay = self.pre.instantiate(&mut store)?;
        Ok((store, relay))
    }

    fn contain<T>(&self, result: wasmtime::Result<T>) -> Result<T, CallError> {
        result.map_err(|e| {
            if e.is::<CpuExhausted>() || e.chain().any(|cause| cause.is::<CpuExhausted>()) {
                CallError::CpuLimit(self.limits.cpu)
            } else {
                // The root cause says what happened; the wasm backtrace is for debugging.
                crate::logging::debug(&format!("component trap: {e:?}"));
                CallError::Trap(
                    e.chain()
                        .last()
                        .map(ToString::to_string)
                        .unwrap_or_else(|| e.to_string()),
                )
            }
        })
    }

    /// The `accept` stage for claimed files of the Queue folder, in one call.
    pub fn accept(
        &self,
        files: &[stages::ClaimedFile],
        options: &stages::RelayOptions,
    ) -> Result<Vec<Result<stages::Accepted, stages::Rejection>>, CallError> {
        let context = files.first().map_or("accept", |f| f.queue_id.as_str());
        let results = self.contain(self.instantiate(context).and_then(|(mut store, relay)| {
            relay
                .mailroot_relay_stages()
                .call_accept(&mut store, files, options)
        }))?;
        if results.len() != files.len() {
            return Err(CallError::Trap(format!(
                "accept returned {} results for {} files",
                results.len(),
                files.len()
            )));
        }
        Ok(results)
    }

    /// The `deliver` stage for a batch of queued messages. `recorder`
    /// hands over more messages while the call runs, serves the fresh ones
    /// from memory and stores each report as the component hands it over;
    /// it comes back with what it recorded, whatever became of the call.
    pub fn deliver(
        &self,
        messages: &[QueuedMessage],
        options: &stages::RelayOptions,
        recorder: Recorder,
    ) -> (Recorder, Result<(), CallError>) {
        let context = messages
            .first()
            .map(|m| m.state.queue_id.as_str())
            .unwrap_or("deliver");
        let (mut store, relay) = match self.instantiate(context) {
            Ok(instance) => instance,
            Err(e) => return (recorder, self.contain(Err(e))),
        };
        store.data_mut().recorder = Some(recorder);
        let outcome = relay
            .mailroot_relay_stages()
            .call_deliver(&mut store, messages, options);
        let outcome = self.contain(outcome);
        let state = store.into_data();
        match state.recorder {
            Some(recorder) => (recorder, outcome),
            // The field is private to this module, and only this function
            // takes the recorder out of the store.
            None => unreachable!("the recorder left the store"),
        }
    }

    /// The `explain` stage: what the relay would do with `raw`.
    pub fn explain(
        &self,
        raw: &[u8],
        options: &stages::RelayOptions,
    ) -> Result<stages::Explanation, CallError> {
        self.contain(self.instantiate("check").and_then(|(mut store, relay)| {
            relay
                .mailroot_relay_stages()
                .call_explain(&mut store, raw, options)
        }))
    }

    /// The retry schedule the component defines under `name`.
    pub fn retry_profile(
        &self,
        name: &str,
    ) -> Result<Option<bindings::mailroot::relay::types::RetrySchedule>, CallError> {
        self.contain(
            self.instantiate("retry-profile")
                .and_then(|(mut store, relay)| {
                    relay
                        .mailroot_relay_mail_logic()
                        .call_retry_profile(&mut store, name)
                }),
        )
    }
}

/// Compile `bytes`, or load the machine code compiled earlier from
/// `cache_dir`, so that start-up does not recompile (Cranelift takes 0.5 to
/// 1.3 s per MiB here). The cache key covers the component's bytes and the
/// engine's compatibility hash, so another component or another wasmtime
/// never loads stale code. The directory must be the service's own:
/// deserializing trusts its content.
fn compile(engine: &Engine, bytes: &[u8], cache_dir: Option<&Path>) -> wasmtime::Result<Component> {
    let Some(dir) = cache_dir else {
        return Component::new(engine, bytes);
    };
    let mut hasher = std::hash::DefaultHasher::new();
    bytes.hash(&mut hasher);
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let name = format!("relay-{:016x}.cwasm", hasher.finish());
    let path = dir.join(&name);
    if path.is_file() {
        // SAFETY: the file was written by `precompile_component` of an engine
        // with the same compatibility hash, into the service's own directory.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => return Ok(component),
            Err(e) => crate::logging::warn(&format!(
                "ignoring the compiled component {}: {e}",
                path.display()
            )),
        }
    }
    let compiled = engine.precompile_component(bytes)?;
    let stored = std::fs::create_dir_all(dir)
        .and_then(|()| crate::queue::write_atomic(dir, &name, &compiled));
    if let Err(e) = stored {
        crate::logging::warn(&format!(
            "cannot cache the compiled component in {}: {e}",
            dir.display()
        ));
    }
    // SAFETY: `compiled` was produced just now by this engine.
    unsafe { Component::deserialize(engine, &compiled) }
}

/// Advance the engine's epoch every [`EPOCH_TICK`] until the engine is gone.
fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("mailroot-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .map(drop)
        .unwrap_or_else(|e| {
            crate::logging::error(&format!(
                "cannot start the epoch thread, CPU limits are off: {e}"
            ))
        });
}
