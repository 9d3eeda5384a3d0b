//! A hostile relay component for the host's limit tests. It is the real
//! component, except that `accept` misbehaves on files that ask for it:
//! - a file containing `LOOP-FOREVER` spins without end (the CPU deadline must stop it);
//! - a file containing `ALLOCATE-FOREVER` allocates until memory runs out (the cap must stop it).
//!
//! Every other call goes to the real implementation, so the host can be seen
//! to keep relaying ordinary mail beside the hostile files.

#[cfg(target_family = "wasm")]
mod hostile {
    use bindings::exports::mailroot::relay::mail_logic as logic;
    use bindings::exports::mailroot::relay::stages;
    use bindings::mailroot::relay::{folders, types};
    use mailroot_guest::component::Component;
    use mailroot_guest::component::bindings;

    struct Hostile;

    fn misbehave_if_asked(file: &str) {
        let Ok(raw) = folders::read(folders::Folder::Queue, file) else {
            return;
        };
        let asks = |word: &[u8]| raw.windows(word.len()).any(|w| w == word);
        if asks(b"LOOP-FOREVER") {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        if asks(b"ALLOCATE-FOREVER") {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
    }

    impl stages::Guest for Hostile {
        fn explain(raw: Vec<u8>, options: stages::RelayOptions) -> stages::Explanation {
            <Component as stages::Guest>::explain(raw, options)
        }

        fn accept(
            files: Vec<stages::ClaimedFile>,
            options: stages::RelayOptions,
        ) -> Vec<Result<stages::Accepted, stages::Rejection>> {
            for claimed in &files {
                misbehave_if_asked(&claimed.file);
            }
            <Component as stages::Guest>::accept(files, options)
        }

        fn deliver(messages: Vec<types::QueuedMessage>, options: stages::RelayOptions) {
            <Component as stages::Guest>::deliver(messages, options)
        }
    }

    impl logic::Guest for Hostile {
        fn parse(raw: Vec<u8>) -> Result<types::MessageSummary, types::ParseError> {
            <Component as logic::Guest>::parse(raw)
        }
        fn derive_envelope(raw: Vec<u8>) -> Result<types::Envelope, types::EnvelopeError> {
            <Component as logic::Guest>::derive_envelope(raw)
        }
        fn validate(raw: Vec<u8>, limits: types::Limits) -> Vec<types::Finding> {
            <Component as logic::Guest>::validate(raw, limits)
        }
        fn plan_delivery(
            domain: String,
            answer: types::MxAnswer,
            seed: u64,
        ) -> Result<types::DeliveryPlan, types::Failure> {
            <Component as logic::Guest>::plan_delivery(domain, answer, seed)
        }
        fn build_bounce(request: types::BounceRequest) -> Vec<u8> {
            <Component as logic::Guest>::build_bounce(request)
        }
        fn plan_retry(
            schedule: types::RetrySchedule,
            attempts: u32,
            arrival_ms: u64,
            now_ms: u64,
            delay_notice_sent: bool,
        ) -> types::RetryDecision {
            <Component as logic::Guest>::plan_retry(
                schedule,
                attempts,
                arrival_ms,
                now_ms,
                delay_notice_sent,
            )
        }
        fn retry_profile(name: String) -> Option<types::RetrySchedule> {
            <Component as logic::Guest>::retry_profile(name)
        }
        fn choose_route(domain: String, routing: types::Routing) -> types::RouteChoice {
            <Component as logic::Guest>::choose_route(domain, routing)
        }
    }

    bindings::export_relay!(Hostile with_types_in bindings);
}
