//! Kinds, schemas and adapters over real sockets (SPEC §8): each receiver rule with its NACK
//! code, conversion on either side with its lineage, and the connection living on after
//! every refusal.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use xcp::codec::CodecId;
use xcp::conn::{Config, Outgoing};
use xcp::control::KindRange;
use xcp::schema::{Adapter, AdapterGraph, Registry};
use xcp::{Error, ErrorCode, Ether, Server, Session, SessionConfig};

#[path = "support/io_env.rs"]
mod io_env;

fn session_config(conn: Config) -> SessionConfig {
    io_env::config()
        .with_conn(conn)
        .with_request_timeout(Duration::from_secs(10))
}

/// An echo server on 127.0.0.1 port 0 with `conn`: every DATA message is answered with the
/// Ether it delivered (after its own conversions). It serves one session and stops when
/// that session ends.
async fn echo(conn: Config) -> (String, tokio::task::JoinHandle<()>) {
    let server = Server::bind("tcp://127.0.0.1:0", session_config(conn))
        .await
        .expect("bind");
    let url = server.local_url();
    let task = tokio::spawn(async move {
        let s = server.accept().await.expect("accept");
        while let Ok(m) = s.recv().await {
            let e = m.ether().expect("delivered Ethers decode");
            let reply = Outgoing::ether(&e, CodecId::JSON).expect("encode");
            if s.reply(&m, reply).await.is_err() {
                break;
            }
        }
    });
    (url, task)
}

async fn client(url: &str, conn: Config) -> Session {
    tokio::time::timeout(
        Duration::from_secs(10),
        Session::connect(url, session_config(conn)),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}

async fn ask(c: &Session, e: &Ether) -> xcp::Result<Ether> {
    let m = c
        .request(Outgoing::ether(e, CodecId::JSON).expect("encode"))
        .await?;
    m.ether()
}

/// The NACK code and detail of a refused request.
async fn refused(c: &Session, o: Outgoing) -> (ErrorCode, String) {
    match c.request(o).await {
        Err(Error::Nack { code, detail, .. }) => (code, detail),
        other => panic!("expected a NACK, got {other:?}"),
    }
}

async fn lives_on(c: &Session) {
    let back = ask(c, &Ether::text("still here")).await.expect("served");
    assert_eq!(back.payload["text"], "still here");
}

fn accepts(list: &[(&str, u16)]) -> Vec<KindRange> {
    list.iter().map(|(k, m)| KindRange::of(k, *m)).collect()
}

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().expect("object").clone()
}

#[tokio::test]
async fn unknown_kind_is_schema_unknown() {
    let (url, srv) = echo(Config::default().with_accepts(accepts(&[("text", 1)]))).await;
    let c = client(&url, Config::default()).await;
    let o = Outgoing::ether(&Ether::new("pose", obj(json!({"x": 1}))), CodecId::JSON).unwrap();
    let (code, detail) = refused(&c, o).await;
    assert_eq!(code, ErrorCode::ERR_SCHEMA_UNKNOWN);
    assert!(
        detail.contains("\"pose\"") && detail.contains("text@1"),
        "{detail}"
    );
    lives_on(&c).await;
    drop(c);
    srv.await.unwrap();
}

#[tokio::test]
async fn wrong_major_without_adapters_is_kind_mismatch() {
    let (url, srv) =
        echo(Config::default().with_accepts(accepts(&[("embedding", 2), ("text", 1)]))).await;
    let c = client(&url, Config::default()).await;
    let o = Outgoing::ether(&Ether::embedding(&[1.0, 2.0]), CodecId::JSON).unwrap();
    let (code, detail) = refused(&c, o).await;
    assert_eq!(code, ErrorCode::ERR_KIND_MISMATCH);
    assert!(
        detail.contains("major 1") && detail.contains("embedding@2"),
        "{detail}"
    );
    lives_on(&c).await;
    drop(c);
    srv.await.unwrap();
}

#[tokio::test]
async fn receiver_converts_with_lineage() {
    let sc = Config::default()
        .with_accepts(accepts(&[("embedding", 2), ("text", 1)]))
        .with_adapters(AdapterGraph::standard());
    let (url, srv) = echo(sc).await;
    let c = client(&url, Config::default()).await;
    let back = ask(&c, &Ether::embedding(&[3.0, 4.0]).with_trace_id("t-9"))
        .await
        .expect("converted and served");
    assert_eq!(back.schema_version, 2);
    assert_eq!(back.payload["dtype"], "f32");
    assert_eq!(back.payload["norm"], 5.0);
    assert_eq!(back.trace_id(), Some("t-9"));
    let lineage = back.metadata["lineage"].as_array().expect("lineage");
    assert_eq!(lineage.len(), 1);
    assert_eq!(lineage[0]["adapter"], "embedding-v1-to-v2");
    lives_on(&c).await;
    drop(c);
    srv.await.unwrap();
}

/// A test adapter of kind `k`, recording itself in the payload.
struct Step(u16, u16, u32);

impl Adapter for Step {
    fn kind(&self) -> &str {
        "k"
    }
    fn source_major(&self) -> u16 {
        self.0
    }
    fn target_major(&self) -> u16 {
        self.1
    }
    fn cost(&self) -> u32 {
        self.2
    }
    fn convert(&self, e: &mut Ether) -> xcp::Result<()> {
        let steps = e.payload.entry("steps").or_insert_with(|| json!([]));
        if let Value::Array(a) = steps {
            a.push(self.name().into());
        }
        Ok(())
    }
}

#[tokio::test]
async fn cheaper_path_with_more_steps_is_taken() {
    let mut graph = AdapterGraph::new();
    graph.register(Step(1, 4, 10)).unwrap();
    graph.register(Step(1, 2, 1)).unwrap();
    graph.register(Step(2, 3, 1)).unwrap();
    graph.register(Step(3, 4, 1)).unwrap();
    let sc = Config::default()
        .with_accepts(accepts(&[("k", 4), ("text", 1)]))
        .with_adapters(graph);
    let (url, srv) = echo(sc).await;
    let c = client(&url, Config::default()).await;
    let back = ask(&c, &Ether::new("k", Map::new())).await.expect("served");
    assert_eq!(back.schema_version, 4);
    assert_eq!(
        back.payload["steps"],
        json!(["k-v1-to-v2", "k-v2-to-v3", "k-v3-to-v4"])
    );
    assert_eq!(back.metadata["lineage"].as_array().unwrap().len(), 3);
    drop(c);
    srv.await.unwrap();
}

#[tokio::test]
async fn sender_converts_before_sending() {
    // The server takes embedding v1 only and has no adapters: the client converts.
    let (url, srv) =
        echo(Config::default().with_accepts(accepts(&[("embedding", 1), ("text", 1)]))).await;
    let c = client(
        &url,
        Config::default().with_adapters(AdapterGraph::standard()),
    )
    .await;
    let mut e = Ether::embedding(&[3.0, 4.0]);
    AdapterGraph::standard().convert_to(&mut e, 2).unwrap();
    e.metadata.clear();
    let back = ask(&c, &e).await.expect("converted by the sender");
    assert_eq!(back.schema_version, 1);
    assert_eq!(back.payload["dim"], 2);
    assert_eq!(back.metadata["lineage"][0]["adapter"], "embedding-v2-to-v1");
    drop(c);
    srv.await.unwrap();
}

#[tokio::test]
async fn schema_violation_is_malformed_naming_the_pointer() {
    if !xcp::schema::Schema::validates() {
        return; // built without feature `schema`
    }
    let sc = Config::default().with_registry(Some(Arc::new(Registry::standard())));
    let (url, srv) = echo(sc).await;
    let c = client(&url, Config::default()).await;
    // Ether::validate takes any list of token ids; the schema wants integers.
    let bad = Ether::new("tokens", obj(json!({"token_ids": [1, "two", 3]})));
    let (code, detail) = refused(&c, Outgoing::ether(&bad, CodecId::JSON).unwrap()).await;
    assert_eq!(code, ErrorCode::ERR_MALFORMED);
    assert!(detail.contains("/payload/token_ids/1"), "{detail}");
    lives_on(&c).await;
    drop(c);
    srv.await.unwrap();
}

#[tokio::test]
async fn hash_mismatch_is_schema_unknown() {
    let reg = Arc::new(Registry::standard());
    let (url, srv) = echo(Config::default().with_registry(Some(reg.clone()))).await;
    let c = client(&url, Config::default().with_registry(Some(reg.clone()))).await;
    // The client's registry fills the key; the server's agrees.
    lives_on(&c).await;
    let mut o = Outgoing::ether(&Ether::text("hi"), CodecId::JSON).unwrap();
    o.schema_key.hash128 = [0xAB; 16];
    let (code, detail) = refused(&c, o).await;
    assert_eq!(code, ErrorCode::ERR_SCHEMA_UNKNOWN);
    assert!(detail.contains("schema hash differs"), "{detail}");
    lives_on(&c).await;
    drop(c);
    srv.await.unwrap();
}

/// The Python proof of concept's kind ids are not FNV-1a (SPEC §2.1): a server with empty
/// `accepts` serves them, with or without a registry.
#[tokio::test]
async fn empty_accepts_takes_kind_ids_that_are_not_fnv1a() {
    for sc in [
        Config::default(),
        Config::default().with_registry(Some(Arc::new(Registry::standard()))),
    ] {
        let (url, srv) = echo(sc).await;
        let c = client(&url, Config::default()).await;
        let mut o = Outgoing::ether(&Ether::text("from the PoC"), CodecId::JSON).unwrap();
        o.schema_key.kind_id = 0x0000_0001;
        let m = c.request(o).await.expect("served");
        assert_eq!(m.ether().unwrap().payload["text"], "from the PoC");
        drop(c);
        srv.await.unwrap();
    }
}
