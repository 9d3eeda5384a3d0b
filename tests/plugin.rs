//! The `plugin` world loaded the way another mail server would load it: a
//! plain wasmtime `Linker` with wasmtime-wasi and nothing else.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use mailroot::plugin::bindings::Plugin;
use mailroot::plugin::bindings::mailroot::relay::types::{
    BounceRequest, DsnAction, DsnRecipient, EnvelopeError, EnvelopeSource, Limits, MxAnswer,
    MxRecord, Severity,
};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

struct State {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn load() -> (Store<State>, Plugin) {
    let engine = Engine::default();
    let component = Component::new(&engine, mailroot::PLUGIN_COMPONENT).unwrap();
    // Besides WASI, the only import allowed is the type-only `types`
    // interface: it holds no function or resource a host must supply.
    for (name, item) in component.component_type().imports(&engine) {
        if name.starts_with("wasi:") {
            continue;
        }
        let ComponentItem::ComponentInstance(instance) = item.ty else {
            panic!("the plug-in imports {name}, which a WASI-only host cannot supply");
        };
        for (export, item) in instance.exports(&engine) {
            assert!(
                matches!(item.ty, ComponentItem::Type(_)),
                "the plug-in imports {name}/{export}, which a WASI-only host cannot supply"
            );
        }
    }
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).unwrap();
    let mut store = Store::new(
        &engine,
        State {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
        },
    );
    let plugin = Plugin::instantiate(&mut store, &component, &linker).unwrap();
    (store, plugin)
}

#[test]
fn parse_envelope_and_validate() {
    let (mut store, plugin) = load();
    let logic = plugin.mailroot_relay_mail_logic();
    let raw = "x-sender: s@src.test\r\nx-receiver: r@d1.test\r\nFrom: S <s@src.test>\r\nTo: t@d1.test\r\nSubject: caf\u{e9}\r\n\r\nbody\n".as_bytes();
    let summary = logic.call_parse(&mut store, raw).unwrap().unwrap();
    assert_eq!(summary.from, vec!["s@src.test"]);
    assert_eq!(summary.to, vec!["t@d1.test"]);
    assert!(
        summary.has_pickup_envelope
            && summary.has_eight_bit
            && summary.has_utf8_headers
            && summary.bare_line_endings
    );
    assert_eq!(summary.subject.as_deref(), Some("caf\u{e9}"));

    let envelope = logic
        .call_derive_envelope(&mut store, raw)
        .unwrap()
        .unwrap();
    assert_eq!(
        (envelope.sender.as_str(), envelope.recipients.as_slice()),
        ("s@src.test", &["r@d1.test".to_string()][..])
    );
    assert!(matches!(envelope.source, EnvelopeSource::PickupLines));
    let missing = logic
        .call_derive_envelope(&mut store, b"From: s@src.test\r\n\r\nx")
        .unwrap();
    assert!(matches!(missing, Err(EnvelopeError::NoRecipients)));

    let limits = Limits {
        max_message_bytes: 10,
        max_recipients: 10,
    };
    let findings = logic.call_validate(&mut store, raw, limits).unwrap();
    assert_eq!(findings.len(), 1);
    assert!(matches!(findings[0].severity, Severity::Reject));
    assert_eq!(findings[0].code, "too-large");
}

#[test]
fn route_and_bounce() {
    let (mut store, plugin) = load();
    let logic = plugin.mailroot_relay_mail_logic();
    let answer = MxAnswer::Records(vec![
        MxRecord {
            preference: 20,
            exchange: "b.example.".into(),
        },
        MxRecord {
            preference: 10,
            exchange: "a.example.".into(),
        },
    ]);
    let plan = logic
        .call_plan_delivery(&mut store, "example.com", &answer, 1)
        .unwrap()
        .unwrap();
    assert_eq!(plan.hosts, vec!["a.example", "b.example"]);
    let null = MxAnswer::Records(vec![MxRecord {
        preference: 0,
        exchange: ".".into(),
    }]);
    let failure = logic
        .call_plan_delivery(&mut store, "null.example", &null, 1)
        .unwrap()
        .unwrap_err();
    assert!(failure.permanent);
    assert_eq!(failure.status, "5.1.10");

    let request = BounceRequest {
        reporting_mta: "relay.test".into(),
        original_sender: "s@src.test".into(),
        arrival_date: "Thu, 03 Dec 2026 17:00:00 +0000".into(),
        date: "Thu, 03 Dec 2026 18:00:00 +0000".into(),
        message_id: "Q1.dsn@relay.test".into(),
        will_retry_until: None,
        recipients: vec![DsnRecipient {
            recipient: "r@d1.test".into(),
            action: DsnAction::Failed,
            status: "5.1.1".into(),
            remote_mta: Some("mx.d1.test".into()),
            diagnostic: Some("550 5.1.1 no such user".into()),
        }],
        original: b"From: s@src.test\r\nSubject: hi\r\n\r\nbody\r\n".to_vec(),
    };
    let dsn = String::from_utf8(logic.call_build_bounce(&mut store, &request).unwrap()).unwrap();
    assert!(dsn.contains("report-type=delivery-status"));
    assert!(
        dsn.contains(
            "\r\nFinal-Recipient: rfc822; r@d1.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        )
    );
    assert!(dsn.contains("\r\nDiagnostic-Code: smtp; 550 5.1.1 no such user\r\n"));
}

#[test]
fn the_host_library_loads_the_plugin_too() {
    let mut plugin = mailroot::plugin::Plugin::load(mailroot::PLUGIN_COMPONENT).unwrap();
    let summary = plugin
        .parse(b"From: a@example.com\r\nTo: b@example.org\r\n\r\nhi\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(summary.to, vec!["b@example.org"]);
}
