//! Adapters between major versions of a kind, and the costed graph that routes through them
//! (SPEC §8).
//!
//! ```
//! use xcp::schema::AdapterGraph;
//! use xcp::ether::fnv1a32;
//! use xcp::Ether;
//!
//! let graph = AdapterGraph::standard();
//! let path = graph.path(fnv1a32("embedding"), 1, |m| m == 2).expect("v1 -> v2");
//! let mut e = Ether::embedding(&[3.0, 4.0]);
//! graph.apply(&mut e, &path).unwrap();
//! assert_eq!(e.schema_version, 2);
//! assert_eq!(e.payload["norm"], 5.0);
//! assert_eq!(e.metadata["lineage"][0]["adapter"], "embedding-v1-to-v2");
//! ```

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::control::AdapterEdge;
use crate::error::{Error, Result, Violation};
use crate::ether::{fnv1a32, Ether};

/// A conversion of an Ether payload from `(kind, from_major)` to `(kind, to_major)`.
///
/// The graph sets `schema_version` and appends the lineage entry; `convert` only rewrites
/// the payload (and may touch `extra_fields`). Unknown payload fields should be kept.
pub trait Adapter: Send + Sync {
    /// The kind converted, such as `embedding`.
    fn kind(&self) -> &str;
    /// The major version taken.
    fn source_major(&self) -> u16;
    /// The major version produced.
    fn target_major(&self) -> u16;
    /// What a conversion costs (lower is cheaper); the graph picks the cheapest path.
    fn cost(&self) -> u32 {
        1
    }
    /// The name recorded in `metadata.lineage`.
    fn name(&self) -> String {
        format!(
            "{}-v{}-to-v{}",
            self.kind(),
            self.source_major(),
            self.target_major()
        )
    }
    /// Rewrites `ether` (at `from_major`) into the payload of `to_major`.
    ///
    /// Errors: an Ether this adapter cannot convert, as `Error::Protocol` with
    /// `ERR_MALFORMED` naming the field.
    fn convert(&self, ether: &mut Ether) -> Result<()>;
}

/// A path through the graph: the adapters to apply, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Path {
    steps: Vec<usize>,
    cost: u64,
    to_major: u16,
}

impl Path {
    /// The total cost.
    pub fn cost(&self) -> u64 {
        self.cost
    }

    /// How many adapters it applies.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether it applies none.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The major version it ends at.
    pub fn target_major(&self) -> u16 {
        self.to_major
    }
}

/// The most adapters a graph holds.
pub const MAX_ADAPTERS: usize = 1024;

/// A side's adapters: a directed graph over `(kind, major)` (SPEC §8). Cheap to clone.
#[derive(Clone, Default)]
pub struct AdapterGraph {
    adapters: Vec<Arc<dyn Adapter>>,
}

impl std::fmt::Debug for AdapterGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.adapters.iter().map(|a| a.name()))
            .finish()
    }
}

impl AdapterGraph {
    /// A graph without adapters.
    pub fn new() -> AdapterGraph {
        AdapterGraph::default()
    }

    /// The built-in adapters: `embedding` v1 → v2 and v2 → v1, cost 1 each.
    pub fn standard() -> AdapterGraph {
        let mut g = AdapterGraph::new();
        g.adapters.push(Arc::new(EmbeddingV1ToV2));
        g.adapters.push(Arc::new(EmbeddingV2ToV1));
        g
    }

    /// Adds an adapter. Errors: `Error::Invalid` when it maps a major to itself or the graph
    /// holds [`MAX_ADAPTERS`].
    pub fn register(&mut self, adapter: impl Adapter + 'static) -> Result<&mut Self> {
        self.register_arc(Arc::new(adapter))
    }

    /// Adds a shared adapter; see [`AdapterGraph::register`].
    pub fn register_arc(&mut self, adapter: Arc<dyn Adapter>) -> Result<&mut Self> {
        if adapter.source_major() == adapter.target_major() {
            return Err(Error::invalid(format!(
                "adapter {}: from and to major are both {}",
                adapter.name(),
                adapter.target_major()
            )));
        }
        if self.adapters.len() >= MAX_ADAPTERS {
            return Err(Error::invalid(format!(
                "adapter graph: more than {MAX_ADAPTERS} adapters"
            )));
        }
        self.adapters.push(adapter);
        Ok(self)
    }

    /// Whether it holds no adapter.
    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// The adapters, in the order registered.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Adapter>> {
        self.adapters.iter()
    }

    /// The `adapters` of HELLO / CAPS (SPEC §6).
    pub fn edges(&self) -> Vec<AdapterEdge> {
        self.adapters
            .iter()
            .map(|a| AdapterEdge {
                kind_id: fnv1a32(a.kind()),
                from_major: a.source_major(),
                to_major: a.target_major(),
                cost: a.cost(),
            })
            .collect()
    }

    /// The cheapest path from `(kind_id, from)` to a major other than `from` for which
    /// `accept` is true (Dijkstra; among equal costs the fewest steps, then the lowest major).
    /// `None` when no accepted major is reachable.
    pub fn path(&self, kind_id: u32, from: u16, accept: impl Fn(u16) -> bool) -> Option<Path> {
        let edges: Vec<(usize, u16, u16, u64)> = self
            .adapters
            .iter()
            .enumerate()
            .filter(|(_, a)| fnv1a32(a.kind()) == kind_id)
            .map(|(i, a)| (i, a.source_major(), a.target_major(), u64::from(a.cost())))
            .collect();
        if edges.is_empty() {
            return None;
        }
        // Best (cost, steps) known per major, and the edge that reached it.
        let mut best: HashMap<u16, ((u64, u32), Option<usize>)> = HashMap::new();
        let mut heap = BinaryHeap::new();
        best.insert(from, ((0, 0), None));
        heap.push(Reverse((0u64, 0u32, from)));
        while let Some(Reverse((cost, steps, major))) = heap.pop() {
            if best.get(&major).is_some_and(|(b, _)| *b < (cost, steps)) {
                continue; // a stale entry
            }
            if major != from && accept(major) {
                let mut out = Vec::new();
                let mut at = major;
                while let Some((_, Some(e))) = best.get(&at) {
                    out.push(*e);
                    at = self.adapters[*e].source_major();
                }
                out.reverse();
                return Some(Path {
                    steps: out,
                    cost,
                    to_major: major,
                });
            }
            for &(i, f, t, c) in &edges {
                if f != major {
                    continue;
                }
                let next = (cost + c, steps + 1);
                if best.get(&t).is_none_or(|(b, _)| next < *b) {
                    best.insert(t, (next, Some(i)));
                    heap.push(Reverse((next.0, next.1, t)));
                }
            }
        }
        None
    }

    /// Applies `path` to `ether`: each adapter converts it, `schema_version` follows, and an
    /// entry `{"adapter", "kind", "from_major", "to_major"}` is appended to
    /// `metadata.lineage` per adapter.
    ///
    /// Errors: an adapter's own error; `Error::Invalid` when the path does not start at the
    /// Ether's `schema_version` (a path from another graph or Ether).
    pub fn apply(&self, ether: &mut Ether, path: &Path) -> Result<()> {
        for &i in &path.steps {
            let a = self
                .adapters
                .get(i)
                .ok_or_else(|| Error::invalid("adapter path from another graph"))?;
            if ether.kind != a.kind() || ether.schema_version != u32::from(a.source_major()) {
                return Err(Error::invalid(format!(
                    "adapter {}: the Ether is {}@{}",
                    a.name(),
                    ether.kind,
                    ether.schema_version
                )));
            }
            a.convert(ether)?;
            ether.schema_version = u32::from(a.target_major());
            let mut entry = Map::new();
            entry.insert("adapter".into(), a.name().into());
            entry.insert("kind".into(), a.kind().into());
            entry.insert("from_major".into(), a.source_major().into());
            entry.insert("to_major".into(), a.target_major().into());
            push_lineage(ether, Value::Object(entry));
        }
        Ok(())
    }

    /// Converts `ether` to major `to` by the cheapest path. Errors: `Error::Invalid` when no
    /// path leads there; an adapter's own error.
    pub fn convert_to(&self, ether: &mut Ether, to: u16) -> Result<Path> {
        let from = u16::try_from(ether.schema_version).unwrap_or(u16::MAX);
        if from == to {
            return Ok(Path {
                steps: Vec::new(),
                cost: 0,
                to_major: to,
            });
        }
        let path = self
            .path(fnv1a32(&ether.kind), from, |m| m == to)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "no adapter path from {}@{from} to {}@{to}",
                    ether.kind, ether.kind
                ))
            })?;
        self.apply(ether, &path)?;
        Ok(path)
    }
}

/// Appends `entry` to `metadata.lineage`, starting the list when there is none (a value
/// that is not a list is kept as its first entry).
fn push_lineage(ether: &mut Ether, entry: Value) {
    let slot = ether
        .metadata
        .entry("lineage")
        .or_insert_with(|| Value::Array(Vec::new()));
    if !slot.is_array() {
        let old = slot.take();
        *slot = Value::Array(vec![old]);
    }
    if let Value::Array(list) = slot {
        list.push(entry);
    }
}

fn bad(adapter: &str, detail: impl std::fmt::Display) -> Error {
    Error::malformed(Violation::Body, format!("adapter {adapter}: {detail}"))
}

/// The numbers of `payload.values`.
fn values(payload: &Map<String, Value>, adapter: &str) -> Result<Vec<f64>> {
    let Some(Value::Array(vs)) = payload.get("values") else {
        return Err(bad(
            adapter,
            "/payload/values: expected an array of numbers",
        ));
    };
    vs.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_f64()
                .ok_or_else(|| bad(adapter, format!("/payload/values/{i}: expected a number")))
        })
        .collect()
}

/// `embedding` v1 `{values, dim}` → v2 `{values, dtype: "f32", norm}`.
#[derive(Clone, Copy, Debug, Default)]
pub struct EmbeddingV1ToV2;

impl Adapter for EmbeddingV1ToV2 {
    fn kind(&self) -> &str {
        crate::ether::kinds::EMBEDDING
    }
    fn source_major(&self) -> u16 {
        1
    }
    fn target_major(&self) -> u16 {
        2
    }
    fn convert(&self, ether: &mut Ether) -> Result<()> {
        let vs = values(&ether.payload, "embedding-v1-to-v2")?;
        let norm = vs.iter().map(|v| v * v).sum::<f64>().sqrt();
        ether.payload.remove("dim");
        ether.payload.insert("dtype".into(), "f32".into());
        ether.payload.insert("norm".into(), norm.into());
        Ok(())
    }
}

/// `embedding` v2 `{values, dtype, norm}` → v1 `{values, dim}`.
#[derive(Clone, Copy, Debug, Default)]
pub struct EmbeddingV2ToV1;

impl Adapter for EmbeddingV2ToV1 {
    fn kind(&self) -> &str {
        crate::ether::kinds::EMBEDDING
    }
    fn source_major(&self) -> u16 {
        2
    }
    fn target_major(&self) -> u16 {
        1
    }
    fn convert(&self, ether: &mut Ether) -> Result<()> {
        let n = values(&ether.payload, "embedding-v2-to-v1")?.len();
        ether.payload.remove("dtype");
        ether.payload.remove("norm");
        ether.payload.insert("dim".into(), n.into());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test adapter of kind `k` that records its name in the payload.
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
        fn convert(&self, e: &mut Ether) -> Result<()> {
            let seen = e
                .payload
                .entry("seen")
                .or_insert_with(|| Value::Array(vec![]));
            if let Value::Array(a) = seen {
                a.push(self.name().into());
            }
            Ok(())
        }
    }

    fn graph(steps: &[(u16, u16, u32)]) -> AdapterGraph {
        let mut g = AdapterGraph::new();
        for &(f, t, c) in steps {
            g.register(Step(f, t, c)).unwrap();
        }
        g
    }

    #[test]
    fn three_cheap_steps_beat_one_dear_step() {
        // 1 -> 4 costs 10; 1 -> 2 -> 3 -> 4 costs 3.
        let g = graph(&[(1, 4, 10), (1, 2, 1), (2, 3, 1), (3, 4, 1)]);
        let p = g.path(fnv1a32("k"), 1, |m| m == 4).unwrap();
        assert_eq!((p.cost(), p.len(), p.target_major()), (3, 3, 4));
        let mut e = Ether::new("k", Map::new());
        g.apply(&mut e, &p).unwrap();
        assert_eq!(e.schema_version, 4);
        assert_eq!(
            e.payload["seen"],
            serde_json::json!(["k-v1-to-v2", "k-v2-to-v3", "k-v3-to-v4"])
        );
        let lineage = e.metadata["lineage"].as_array().unwrap();
        assert_eq!(lineage.len(), 3);
        assert_eq!(lineage[2]["from_major"], 3);
    }

    #[test]
    fn ties_go_to_fewer_steps() {
        // Both cost 3: the direct adapter wins, whichever was registered first.
        for steps in [
            [(1, 2, 1), (2, 3, 1), (3, 4, 1), (1, 4, 3)],
            [(1, 4, 3), (1, 2, 1), (2, 3, 1), (3, 4, 1)],
        ] {
            let p = graph(&steps).path(fnv1a32("k"), 1, |m| m == 4).unwrap();
            assert_eq!((p.cost(), p.len()), (3, 1), "{steps:?}");
        }
    }

    #[test]
    fn no_path_and_cycles() {
        let g = graph(&[(1, 2, 1), (2, 1, 1), (3, 4, 1)]);
        assert!(g.path(fnv1a32("k"), 1, |m| m == 4).is_none());
        assert!(g.path(fnv1a32("other"), 1, |m| m == 2).is_none());
        // The nearest accepted major is chosen among several.
        let g = graph(&[(1, 2, 5), (1, 3, 1)]);
        assert_eq!(
            g.path(fnv1a32("k"), 1, |m| m >= 2).unwrap().target_major(),
            3
        );
        assert!(AdapterGraph::new().register(Step(1, 1, 1)).is_err());
    }

    #[test]
    fn embedding_round_trip() {
        let g = AdapterGraph::standard();
        let mut e = Ether::embedding(&[3.0, 4.0]).with_trace_id("t");
        g.convert_to(&mut e, 2).unwrap();
        assert_eq!(e.payload["dtype"], "f32");
        assert_eq!(e.payload["norm"], 5.0);
        assert!(e.payload.get("dim").is_none());
        g.convert_to(&mut e, 1).unwrap();
        assert_eq!(e.payload["dim"], 2);
        assert_eq!(e.schema_version, 1);
        assert_eq!(e.metadata["lineage"].as_array().unwrap().len(), 2);
        assert_eq!(e.trace_id(), Some("t"));
        let mut bad = Ether::new("embedding", Map::new());
        let err = g.convert_to(&mut bad, 2).unwrap_err();
        assert_eq!(err.code(), crate::ErrorCode::ERR_MALFORMED);
        assert!(err.to_string().contains("/payload/values"), "{err}");
        assert!(g.convert_to(&mut Ether::text("x"), 2).is_err());
    }
}
