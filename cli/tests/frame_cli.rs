//! `xcp frame encode` and `xcp frame decode`, run for real: the round trip of every body kind
//! in both header forms, chunking with MORE, COMP and CRYPT with key files, the error lines
//! (bad checksum, wrong key, wrong direction), refused key files, and the golden PING vectors.
//!
//! Every child process is owned by a guard that kills it on drop, stdin is written on its own
//! thread (so a child that fills its stdout pipe never deadlocks the test), and every wait has
//! a deadline.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

/// How long any one command may take (generous: CI machines are slow and busy).
const DEADLINE: Duration = Duration::from_secs(60);

const ERR_CHECKSUM: u64 = 5;
const ERR_DECRYPT: u64 = 6;

/// A child process that is killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a finished command left.
struct Output {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

impl Output {
    fn describe(&self) -> String {
        format!(
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            String::from_utf8_lossy(&self.stdout),
            self.stderr
        )
    }

    /// The stdout of `decode`: one JSON value per line.
    fn lines(&self) -> Vec<Value> {
        String::from_utf8_lossy(&self.stdout)
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\n{}", self.describe()))
            })
            .collect()
    }
}

/// Runs `xcp ARGS` with `stdin`, extra environment variables, to completion within
/// [`DEADLINE`].
fn run_env(args: &[&str], stdin: &[u8], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xcp"));
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("XCP_KEY_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = Guard(cmd.spawn().expect("spawn xcp"));
    let mut pipe = child.0.stdin.take().unwrap();
    let input = stdin.to_vec();
    let writer = thread::spawn(move || {
        // The child may exit before reading everything (a usage error): that is fine.
        let _ = pipe.write_all(&input);
    });
    let mut out_pipe = child.0.stdout.take().unwrap();
    let mut err_pipe = child.0.stderr.take().unwrap();
    let out_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("try_wait") {
            break s;
        }
        if start.elapsed() > DEADLINE {
            panic!("xcp {args:?} did not exit within {DEADLINE:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    writer.join().unwrap();
    Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned(),
    }
}

fn run(args: &[&str], stdin: &[u8]) -> Output {
    run_env(args, stdin, &[])
}

/// `xcp frame encode ARGS` of `descs` (JSON lines); asserts success and returns the bytes.
fn encode(descs: &[Value], args: &[&str]) -> Vec<u8> {
    let input: String = descs.iter().map(|d| format!("{d}\n")).collect();
    let mut all = vec!["frame", "encode"];
    all.extend_from_slice(args);
    let out = run(&all, input.as_bytes());
    assert!(
        out.status.success(),
        "encode {descs:?} failed\n{}",
        out.describe()
    );
    out.stdout
}

/// `xcp frame decode ARGS` of `bytes`; returns the output (any exit status).
fn decode(bytes: &[u8], args: &[&str]) -> Output {
    let mut all = vec!["frame", "decode"];
    all.extend_from_slice(args);
    run(&all, bytes)
}

/// `decode`, asserting success, returning the lines.
fn decode_ok(bytes: &[u8], args: &[&str]) -> Vec<Value> {
    let out = decode(bytes, args);
    assert!(out.status.success(), "decode failed\n{}", out.describe());
    out.lines()
}

/// A description with every header field set, as `decode` prints it.
fn full(msg_type: u16, codec: u16, form: &str, body: Value) -> Value {
    json!({
        "header": {
            "channelId": 3, "msgType": msg_type, "bodyCodec": codec, "msgId": 41,
            "inReplyTo": 40,
            "schemaKey": {"nsHash": 0x811C_9DC5u32, "kindId": 0xCDE5_B5F2u32, "major": 1,
                          "minor": 2, "hash128": "000102030405060708090a0b0c0d0e0f"},
            "tags": [{"key": "trace", "val": "t-1"}, {"key": "", "val": "empty key"}]
        },
        "header_form": form,
        "comp": false,
        "crypt": false,
        "body": body,
    })
}

/// A key file of `bytes` with `mode`, in `dir`.
fn key_file(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// Walks concatenated frames: (FLAGS byte, payload length) of each.
fn frames(bytes: &[u8]) -> Vec<(u8, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        assert_eq!(
            &bytes[at..at + 4],
            &[0x10, 0x7A, 0xA1, 0xA9],
            "magic at {at}"
        );
        let flags = bytes[at + 5];
        let hlen = u16::from_le_bytes([bytes[at + 6], bytes[at + 7]]) as usize;
        let p = at + 8 + hlen;
        let plen = u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap()) as usize;
        out.push((flags, plen));
        at = p + 4 + plen + 4;
    }
    assert_eq!(
        at,
        bytes.len(),
        "frames end exactly at the end of the output"
    );
    out
}

fn error_code(line: &Value) -> Option<u64> {
    line.get("error").and_then(|e| e["code"].as_u64())
}

/// Every body kind, in its full form: the descriptions `decode` prints back unchanged.
fn exact_descriptions(form: &str) -> Vec<Value> {
    let data = 0x0100;
    let f32_bytes: Vec<u8> = [1.0f32, -2.5, 3.25, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let foreign = foreign_arrow_stream();
    vec![
        // ether, JSON
        full(
            data,
            1,
            form,
            json!({"ether": {"kind": "text", "schema_version": 1,
                             "payload": {"text": "hello, frames"},
                             "metadata": {"trace_id": "t-1", "producer": "test"}}}),
        ),
        // ether, PROTOBUF
        full(
            data,
            8,
            form,
            json!({"ether": {"kind": "embedding", "schema_version": 1,
                             "payload": {"values": [0.5, 1.5, -2.0], "dim": 3},
                             "metadata": {"lineage": ["a", "b"]},
                             "extra_fields": {"note": "kept"}}}),
        ),
        // control: PING (JSON and PROTOBUF), NACK, HELLO
        full(4, 1, form, json!({"control": {"nonce": 42}})),
        full(4, 8, form, json!({"control": {"nonce": 7}})),
        full(
            3,
            1,
            form,
            json!({"control": {"msg_id": 9, "error_code": 5, "retry_after_ms": 250,
                               "detail": "crc32c mismatch"}}),
        ),
        full(
            0,
            1,
            form,
            json!({"control": {"codecs": [1, 2, 8], "max_frame_bytes": 65536,
                               "accepts": [{"kind_id": 3_453_859_314u32, "major": 1,
                                            "min_minor": 0, "max_minor": 3}],
                               "emits": [], "shared_mem": false, "version": "0.2",
                               "attach": ["shm"], "host_id": "h-1", "shm_prefix": "xcp-",
                               "crypt": true, "max_message_bytes": 1_048_576}}),
        ),
        // tensors whose values are exact in their dtype
        full(
            data,
            2,
            form,
            json!({"tensor": {"dtype": "f32", "shape": [2, 3],
                              "values": [0.1, -1.5, 3.0, 1e-7, 65504.0, -0.0],
                              "row_qnt": false, "col_major": false, "scale": 1.0}}),
        ),
        full(
            data,
            3,
            form,
            json!({"tensor": {"dtype": "f16", "shape": [3, 2],
                              "values": [0.5, -1.5, 1024.0, 0.099975586, 2.25, -0.125],
                              "row_qnt": false, "col_major": true, "scale": 1.0}}),
        ),
        full(
            data,
            4,
            form,
            json!({"tensor": {"dtype": "qnt8", "shape": [4],
                              "values": [1.0, -2.5, 63.5, 0.0],
                              "row_qnt": false, "col_major": false, "scale": 0.5}}),
        ),
        // mixed latent
        full(
            data,
            0x10,
            form,
            json!({"latent": [
                {"dtype": "f32", "shape": [2], "values": [1.0, 2.0],
                 "row_qnt": false, "col_major": false, "scale": 1.0},
                {"dtype": "qnt8", "shape": [3], "values": [0.25, -0.5, 31.75],
                 "row_qnt": false, "col_major": false, "scale": 0.25},
                {"dtype": "f16", "shape": [1, 1], "values": [-3.0],
                 "row_qnt": false, "col_major": false, "scale": 1.0}
            ]}),
        ),
        // Arrow: a batch of Ethers, and a foreign table
        full(
            data,
            0x20,
            form,
            json!({"arrow": {"ethers": [
                {"kind": "embedding", "schema_version": 1,
                 "payload": {"values": [0.5, 1.0, 2.0], "dim": 3},
                 "metadata": {"trace_id": "t-9"}},
                {"kind": "embedding", "schema_version": 1,
                 "payload": {"values": [-1.0, 0.0, 0.25], "dim": 3},
                 "metadata": {"trace_id": "t-9"}}
            ]}}),
        ),
        full(data, 0x20, form, json!({"arrow": foreign})),
        // DLPack, inline and by URI
        full(
            data,
            0x21,
            form,
            json!({"dlpack": {"device_type": 1, "device_id": 0,
                              "dtype": {"code": 2, "bits": 32, "lanes": 1},
                              "shape": [2, 2], "strides": [2, 1], "byte_offset": 0,
                              "data_base64": base64::engine::general_purpose::STANDARD
                                  .encode(&f32_bytes)}}),
        ),
        full(
            data,
            0x21,
            form,
            json!({"dlpack": {"device_type": 2, "device_id": 1,
                              "dtype": {"code": 1, "bits": 8, "lanes": 1},
                              "shape": [4, 4], "strides": [1, 4], "byte_offset": 16,
                              "uri": "shm://xcp-test.seg3#128,64"}}),
        ),
        // raw bytes of a codec the tool has no decoder for
        full(data, 0x77, form, json!({"raw_base64": "AAECA/8="})),
    ]
}

/// The description `decode` gives of a foreign Arrow table (no `xcp.kind`): built with
/// arrow-rs, carried as is.
fn foreign_arrow_stream() -> Value {
    use std::sync::Arc;
    let schema = Arc::new(arrow_schema::Schema::new(vec![
        arrow_schema::Field::new("id", arrow_schema::DataType::Int32, false),
        arrow_schema::Field::new("name", arrow_schema::DataType::Utf8, true),
    ]));
    let batch = arrow_array::RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(arrow_array::Int32Array::from(vec![1, 2, 3])),
            Arc::new(arrow_array::StringArray::from(vec![
                Some("a"),
                None,
                Some("c"),
            ])),
        ],
    )
    .unwrap();
    let body = xcp::codec::arrow::encode_batches(&schema, &[batch]).unwrap();
    json!({
        "num_rows": 3,
        "schema": {"fields": [{"name": "id", "type": "Int32", "nullable": false},
                              {"name": "name", "type": "Utf8", "nullable": true}],
                   "metadata": {}},
        "base64": base64::engine::general_purpose::STANDARD.encode(&body),
    })
}

#[test]
fn every_body_kind_round_trips_in_both_header_forms() {
    for form in ["capnp", "json"] {
        let descs = exact_descriptions(form);
        // One description at a time, then all of them as JSON lines in one stream.
        for d in &descs {
            let bytes = encode(std::slice::from_ref(d), &[]);
            let lines = decode_ok(&bytes, &[]);
            assert_eq!(lines, vec![d.clone()], "{form}: decode(encode(d)) != d");
            // encode(decode(bytes)) gives the same bytes back.
            assert_eq!(encode(&lines, &[]), bytes, "{form}: encode(decode(b)) != b");
        }
        let bytes = encode(&descs, &[]);
        assert_eq!(decode_ok(&bytes, &[]), descs, "{form}: JSON lines");
    }
}

#[test]
fn quantised_and_half_tensors_round_trip_within_their_precision() {
    let values: Vec<f32> = (0..24).map(|i| (i as f32 - 11.3) * 0.37).collect();
    for (dtype, codec, row_qnt) in [("f16", 3, false), ("qnt8", 4, false), ("qnt8", 4, true)] {
        let d = json!({"header": {"msgType": 256},
                       "body": {"tensor": {"dtype": dtype, "shape": [4, 6], "values": values,
                                           "row_qnt": row_qnt}}});
        let lines = decode_ok(&encode(&[d], &[]), &[]);
        let t = &lines[0]["body"]["tensor"];
        assert_eq!(lines[0]["header"]["bodyCodec"], codec, "the implied codec");
        assert_eq!(t["dtype"], dtype);
        assert_eq!(t["shape"], json!([4, 6]));
        assert_eq!(t["row_qnt"], row_qnt);
        let got: Vec<f32> = t["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        for (row, (g, want)) in got.chunks(6).zip(values.chunks(6)).enumerate() {
            let max = if row_qnt { want } else { &values[..] }
                .iter()
                .fold(0f32, |m, x| m.max(x.abs()));
            // Half a quantisation step for QNT8, F16's relative precision for F16.
            for (a, b) in g.iter().zip(want) {
                let tol = if dtype == "f16" {
                    b.abs() * 1e-3
                } else {
                    max / 127.0 / 2.0 * 1.001
                };
                assert!((a - b).abs() <= tol, "{dtype} row {row}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn chunking_sets_more_and_decodes_to_one_message() {
    let values: Vec<f32> = (0..100).map(|i| i as f32 * 0.5).collect();
    let d = full(
        0x0100,
        2,
        "capnp",
        json!({"tensor": {"dtype": "f32", "shape": [10, 10], "values": values,
                          "row_qnt": false, "col_major": false, "scale": 1.0}}),
    );
    let bytes = encode(std::slice::from_ref(&d), &["--max-frame-bytes", "64"]);
    let fs = frames(&bytes);
    assert_eq!(fs.len(), (32 + 400usize).div_ceil(64), "{fs:?}");
    for (i, (flags, plen)) in fs.iter().enumerate() {
        let last = i == fs.len() - 1;
        assert_eq!(flags & 0x20 != 0, !last, "MORE on frame {i}");
        assert!(*plen <= 64);
    }
    assert_eq!(decode_ok(&bytes, &[]), vec![d]);

    // A decoder whose frames are smaller refuses the frame and stops.
    let out = decode(&bytes, &["--max-frame-bytes", "32"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    let lines = out.lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["error"]["name"], "ERR_MESSAGE_TOO_LARGE");
    assert_eq!(lines[0]["header"]["msgId"], 41);

    // A message cut short (its last chunk missing) is reported at the end.
    let cut: usize = {
        let hlen = u16::from_le_bytes([bytes[6], bytes[7]]) as usize;
        8 + hlen + 4 + 64 + 4
    };
    let out = decode(&bytes[..cut], &[]);
    assert_eq!(out.status.code(), Some(1));
    let lines = out.lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["error"]["name"], "ERR_MALFORMED");
    assert!(lines[0]["error"]["detail"]
        .as_str()
        .unwrap()
        .contains("last chunk"));
}

#[test]
fn comp_and_crypt_with_a_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", &[7u8; 32], 0o600);
    let other = key_file(dir.path(), "other", &[8u8; 32], 0o600);
    let key_s = key.to_str().unwrap();
    let other_s = other.to_str().unwrap();
    // Compressible: zstd shrinks it, so the sealed body is small.
    let values = vec![0.25f32; 2048];
    let mut d = full(
        0x0100,
        2,
        "capnp",
        json!({"tensor": {"dtype": "f32", "shape": [2048], "values": values,
                          "row_qnt": false, "col_major": false, "scale": 1.0}}),
    );
    d["comp"] = json!(true);
    d["crypt"] = json!(true);
    let bytes = encode(
        std::slice::from_ref(&d),
        &[
            "--key-file",
            key_s,
            "--direction",
            "c2s",
            "--max-frame-bytes",
            "16",
        ],
    );
    let fs = frames(&bytes);
    assert!(fs.len() > 1, "chunked: {fs:?}");
    assert!(
        fs.iter().all(|(f, _)| f & 0xC0 == 0xC0),
        "COMP|CRYPT on every chunk"
    );
    let sealed: usize = fs.iter().map(|(_, p)| p).sum();
    assert!(
        sealed < 8192 / 4,
        "compressed before sealing: {sealed} bytes"
    );
    let args = ["--key-file", key_s, "--direction", "c2s"];
    assert_eq!(decode_ok(&bytes, &args), vec![d.clone()]);
    // The key from the environment works the same.
    let out = run_env(
        &["frame", "decode", "--direction", "c2s"],
        &bytes,
        &[("XCP_KEY_FILE", &key)],
    );
    assert!(out.status.success(), "{}", out.describe());
    assert_eq!(out.lines(), vec![d.clone()]);

    // Wrong key, wrong direction, no key: an ERR_DECRYPT line, exit 1.
    for args in [
        vec!["--key-file", other_s, "--direction", "c2s"],
        vec!["--key-file", key_s, "--direction", "s2c"],
        vec!["--key-file", key_s],
        vec![],
    ] {
        let out = decode(&bytes, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}\n{}", out.describe());
        let lines = out.lines();
        assert_eq!(lines.len(), 1, "{args:?}");
        assert_eq!(
            error_code(&lines[0]),
            Some(ERR_DECRYPT),
            "{args:?}: {}",
            lines[0]
        );
        assert_eq!(lines[0]["error"]["name"], "ERR_DECRYPT");
        assert_eq!(lines[0]["header"], d["header"], "the header is still shown");
        assert!(lines[0]["body"]["raw_base64"].is_string());
    }

    // "crypt": true without a key is a usage error of encode.
    let out = run(&["frame", "encode"], d.to_string().as_bytes());
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("--key-file"), "{}", out.stderr);
    let out = run(
        &["frame", "encode", "--key-file", key_s],
        d.to_string().as_bytes(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("--direction"), "{}", out.stderr);
}

#[test]
fn tampered_header_fails_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", &[1u8; 32], 0o600);
    let key_s = key.to_str().unwrap();
    let args = ["--key-file", key_s, "--direction", "s2c"];
    let mut d = full(4, 1, "json", json!({"control": {"nonce": 5}}));
    d["crypt"] = json!(true);
    let sealed = encode(std::slice::from_ref(&d), &args);
    assert_eq!(decode_ok(&sealed, &args), vec![d.clone()]);
    // The same sealed body under another msgId (in the associated data and the nonce).
    let mut other = d.clone();
    other["header"]["msgId"] = json!(42);
    let lines = decode_ok(&encode(std::slice::from_ref(&other), &args), &args);
    assert_eq!(lines, vec![other]);
    let needle = b"\"msgId\":41";
    let at = sealed
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the JSON header carries the msgId");
    let mut moved = sealed.clone();
    moved[at + needle.len() - 1] = b'3';
    let out = decode(&moved, &args);
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    assert_eq!(error_code(&out.lines()[0]), Some(ERR_DECRYPT));
}

#[test]
fn flipped_payload_byte_is_a_checksum_error_and_decoding_goes_on() {
    let a = full(4, 1, "capnp", json!({"control": {"nonce": 1}}));
    let mut b = a.clone();
    b["header"]["msgId"] = json!(42);
    let first = encode(std::slice::from_ref(&a), &[]);
    let second = encode(std::slice::from_ref(&b), &[]);
    let mut bytes = first.clone();
    let n = bytes.len();
    bytes[n - 4 - 3] ^= 0x01; // a payload byte, just before the CRC trailer
    bytes.extend_from_slice(&second);
    let out = decode(&bytes, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    let lines = out.lines();
    assert_eq!(lines.len(), 2, "{}", out.describe());
    assert_eq!(error_code(&lines[0]), Some(ERR_CHECKSUM));
    assert_eq!(lines[0]["error"]["name"], "ERR_CHECKSUM");
    assert_eq!(lines[0]["header"], a["header"], "the header is known");
    assert!(lines[0]["body"]["raw_base64"].is_string());
    assert_eq!(lines[1], b, "the next frame decodes");

    // A body its codec refuses: raw bytes and ERR_MALFORMED.
    let bad = json!({"header": {"msgType": 256, "bodyCodec": 2},
                     "body": {"raw_base64": "AAEC"}});
    let out = decode(&encode(&[bad], &[]), &[]);
    assert_eq!(out.status.code(), Some(1));
    let line = &out.lines()[0];
    assert_eq!(line["error"]["name"], "ERR_MALFORMED");
    assert_eq!(line["body"], json!({"raw_base64": "AAEC"}));
}

#[test]
fn key_files_are_checked_by_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let short = key_file(dir.path(), "short", &[1u8; 31], 0o600);
    let open = key_file(dir.path(), "open", &[1u8; 32], 0o644);
    let desc = br#"{"body":{"control":{}}}"#;
    for (file, says) in [(&short, "exactly 32 bytes"), (&open, "chmod 600")] {
        let f = file.to_str().unwrap();
        for args in [
            vec!["frame", "encode", "--key-file", f],
            vec!["frame", "decode", "--key-file", f],
            vec!["ping", "tcp://127.0.0.1:9", "--key-file", f],
            vec!["send", "tcp://127.0.0.1:9", "--text", "x", "--key-file", f],
            vec!["serve", "--listen", "tcp://127.0.0.1:0", "--key-file", f],
        ] {
            let out = run(&args, desc);
            assert_eq!(out.status.code(), Some(2), "{args:?}\n{}", out.describe());
            assert!(
                out.stderr.contains(says) && out.stderr.contains("key file"),
                "{args:?}: {}",
                out.stderr
            );
            assert!(out.stdout.is_empty(), "{args:?}: nothing ran");
        }
        let out = run_env(&["frame", "encode"], desc, &[("XCP_KEY_FILE", file)]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "XCP_KEY_FILE\n{}",
            out.describe()
        );
    }
}

#[path = "../../tests/support/hex.rs"]
mod hex;
use hex::parse_hex;

#[test]
fn golden_ping_vectors_decode_to_their_description() {
    for (file, form) in [("ping_capnp.hex", "capnp"), ("ping_json.hex", "json")] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/vectors")
            .join(file);
        let bytes = parse_hex(&std::fs::read_to_string(path).unwrap());
        let expected = json!({
            "header": {"channelId": 0, "msgType": 4, "bodyCodec": 1, "msgId": 1,
                       "inReplyTo": 0,
                       "schemaKey": {"nsHash": 0, "kindId": 0, "major": 0, "minor": 0,
                                     "hash128": "00000000000000000000000000000000"},
                       "tags": []},
            "header_form": form,
            "comp": false,
            "crypt": false,
            "body": {"control": {"nonce": 1}},
        });
        assert_eq!(decode_ok(&bytes, &[]), vec![expected.clone()], "{file}");
        // And the description encodes to the golden bytes.
        assert_eq!(encode(&[expected], &[]), bytes, "{file}");
    }
}

#[test]
fn defaults_and_bad_descriptions() {
    // The help's own example: absent fields are zero, the control body implies JSON.
    let bytes = encode(
        &[json!({"header": {"msgType": 4}, "body": {"control": {"nonce": 1}}})],
        &[],
    );
    let line = &decode_ok(&bytes, &[])[0];
    assert_eq!(line["header"]["msgType"], 4);
    assert_eq!(line["header"]["bodyCodec"], 1);
    assert_eq!(line["header"]["msgId"], 0);
    assert_eq!(line["header_form"], "capnp");
    assert_eq!(line["body"], json!({"control": {"nonce": 1}}));
    // Names work for msgType and bodyCodec.
    let bytes = encode(
        &[
            json!({"header": {"msgType": "DATA", "bodyCodec": "protobuf"},
                 "body": {"ether": {"kind": "text", "schema_version": 1,
                                    "payload": {"text": "x"}, "metadata": {}}}}),
        ],
        &[],
    );
    assert_eq!(decode_ok(&bytes, &[])[0]["header"]["bodyCodec"], 8);

    for (desc, says) in [
        (r#"{"body":{"control":{}}"#, "bad JSON"),
        (
            r#"{"header":{"msgtype":4},"body":{"control":{}}}"#,
            "unknown field \"msgtype\"",
        ),
        (
            r#"{"header":{"msgType":70000},"body":{"control":{}}}"#,
            "header.msgType",
        ),
        (
            r#"{"body":{"tensor":{"dtype":"f64","shape":[1],"values":[1]}}}"#,
            "body.tensor.dtype",
        ),
        (
            r#"{"body":{"tensor":{"dtype":"f32","shape":[2],"values":[1]}}}"#,
            "2 elements",
        ),
        (
            r#"{"header":{"bodyCodec":1},"body":{"tensor":{"dtype":"f32","shape":[1],"values":[1]}}}"#,
            "header.bodyCodec",
        ),
        (r#"{"body":{"ether":{},"raw_base64":""}}"#, "exactly one"),
        (
            r#"{"header_form":"xml","body":{"raw_base64":""}}"#,
            "header_form",
        ),
        ("", "no description"),
    ] {
        let out = run(&["frame", "encode"], desc.as_bytes());
        assert_eq!(out.status.code(), Some(2), "{desc}\n{}", out.describe());
        assert!(out.stderr.contains(says), "{desc}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{desc}: nothing written");
    }
}

#[test]
fn help_texts_explain_the_tool_and_the_key() {
    let out = run(&["frame", "--help"], b"");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "encode",
        "decode",
        "raw_base64",
        "xcp frame encode | xcp frame decode",
        "head -c 32 /dev/urandom",
    ] {
        assert!(
            text.contains(needle),
            "frame --help lacks {needle:?}:\n{text}"
        );
    }
    for sub in ["encode", "decode"] {
        let out = run(&["frame", sub, "--help"], b"");
        let text = String::from_utf8_lossy(&out.stdout);
        for needle in [
            "--key-file",
            "--direction",
            "--max-frame-bytes",
            "XCP_KEY_FILE",
        ] {
            assert!(text.contains(needle), "frame {sub} --help lacks {needle:?}");
        }
    }
    for sub in ["serve", "ping", "send"] {
        let out = run(&[sub, "--help"], b"");
        let text = String::from_utf8_lossy(&out.stdout);
        for needle in ["--key-file", "--compress", "chmod 600", "cannot connect"] {
            assert!(
                text.contains(needle),
                "{sub} --help lacks {needle:?}:\n{text}"
            );
        }
    }
}
