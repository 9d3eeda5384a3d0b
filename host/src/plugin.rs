//! The `plugin` world from a host's side: pure mail functions that need
//! nothing but WASI. This is how another mail server embeds mailroot's logic
//! (parse, envelope, validate, route, bounce) without giving it any I/O.
//!
//! ```no_run
//! let mut plugin = mailroot::plugin::Plugin::load(mailroot::PLUGIN_COMPONENT)?;
//! let summary = plugin.parse(b"From: a@example.com\r\nTo: b@example.org\r\n\r\nhi\r\n")?;
//! # Ok::<(), wasmtime::Error>(())
//! ```

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Bindings of the `plugin` world.
pub mod bindings {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "../wit",
    });
}

use bindings::mailroot::relay::types;

/// Store data of a plug-in: an empty WASI context and a memory cap.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// One instance of a plug-in component. Instances are cheap: make a new one
/// per message to keep messages isolated.
pub struct Plugin {
    store: Store<PluginState>,
    plugin: bindings::Plugin,
}

impl Plugin {
    /// Compile and instantiate a plug-in component with WASI only, and a
    /// 256 MiB memory cap.
    pub fn load(component: &[u8]) -> wasmtime::Result<Self> {
        let mut config = Config::new();
        // For profiling the guest with perf: name the compiled functions in
        // /tmp/perf-PID.map.
        if std::env::var_os("MAILROOT_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)?;
        let component = Component::new(&engine, component)?;
        let mut linker: Linker<PluginState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        let state = PluginState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new().memory_size(256 << 20).build(),
        };
        let mut store = Store::new(&engine, state);
        store.limiter(|state| &mut state.limits);
        let plugin = bindings::Plugin::instantiate(&mut store, &component, &linker)?;
        Ok(Plugin { store, plugin })
    }

    /// Summarize a raw message.
    pub fn parse(
        &mut self,
        raw: &[u8],
    ) -> wasmtime::Result<Result<types::MessageSummary, types::ParseError>> {
        self.plugin
            .mailroot_relay_mail_logic()
            .call_parse(&mut self.store, raw)
    }

    /// Derive the SMTP envelope.
    pub fn derive_envelope(
        &mut self,
        raw: &[u8],
    ) -> wasmtime::Result<Result<types::Envelope, types::EnvelopeError>> {
        self.plugin
            .mailroot_relay_mail_logic()
            .call_derive_envelope(&mut self.store, raw)
    }

    /// Validate against limits.
    pub fn validate(
        &mut self,
        raw: &[u8],
        limits: types::Limits,
    ) -> wasmtime::Result<Vec<types::Finding>> {
        self.plugin
            .mailroot_relay_mail_logic()
            .call_validate(&mut self.store, raw, limits)
    }

    /// Order the exchangers of a domain.
    pub fn plan_delivery(
        &mut self,
        domain: &str,
        answer: &types::MxAnswer,
        seed: u64,
    ) -> wasmtime::Result<Result<types::DeliveryPlan, types::Failure>> {
        self.plugin.mailroot_relay_mail_logic().call_plan_delivery(
            &mut self.store,
            domain,
            answer,
            seed,
        )
    }

    /// Write a DSN.
    pub fn build_bounce(&mut self, request: &types::BounceRequest) -> wasmtime::Result<Vec<u8>> {
        self.plugin
            .mailroot_relay_mail_logic()
            .call_build_bounce(&mut self.store, request)
    }
}
