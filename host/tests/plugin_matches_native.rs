//! The component must describe a message exactly as the same guest code
//! does natively (its byte scans are tuned for WebAssembly): random messages
//! built from the bytes that matter, at every alignment.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use mailroot::plugin::Plugin;
use mailroot::plugin::bindings::mailroot::relay::types::ParseError;
use mailroot_guest::message;

#[test]
fn the_component_summarizes_lines_as_the_native_code_does() {
    let mut plugin = Plugin::load(mailroot::PLUGIN_COMPONENT).unwrap();
    let pieces: [&[u8]; 9] = [
        b"\r\n",
        b"\n",
        b"\r",
        b"\0",
        "\u{e9}".as_bytes(),
        b"abcdefghijklmno",
        b"x",
        &[b'y'; 1001],
        b"Subject: s\r\n",
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..2_000 {
        let mut raw = b"x-sender: a@src.test\r\nFrom: a@src.test\r\n".to_vec();
        for _ in 0..(next() % 40) {
            raw.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
        }
        let native = message::summarize(&raw);
        match (plugin.parse(&raw).unwrap(), native) {
            (Ok(component), Ok(native)) => assert_eq!(
                (
                    component.long_lines,
                    component.longest_line,
                    component.bare_line_endings,
                    component.has_eight_bit,
                    component.size,
                ),
                (
                    native.long_lines,
                    native.longest_line,
                    native.bare_line_endings,
                    native.has_eight_bit,
                    native.size,
                ),
                "{raw:?}"
            ),
            (Err(ParseError::NulByte(at)), Err(message::ParseError::NulByte(native_at))) => {
                assert_eq!(at, native_at, "{raw:?}")
            }
            (component, native) => panic!("{raw:?}: {component:?} against {native:?}"),
        }
    }
}
