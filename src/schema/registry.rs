//! The schema registry (SPEC §8): JSON Schemas of Ether payloads by
//! `(namespace, kind, major, minor)`, loaded from a directory's `index.json` or built in.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::ether::{fnv1a32, SchemaKey};

use super::canonical;

/// The `index.json` and schema files of the standard kinds, as shipped in `schemas/`.
const STANDARD_INDEX: &str = include_str!("../../schemas/index.json");
const STANDARD_FILES: [(&str, &str); 5] = [
    ("text.v1.json", include_str!("../../schemas/text.v1.json")),
    (
        "tokens.v1.json",
        include_str!("../../schemas/tokens.v1.json"),
    ),
    (
        "embedding.v1.json",
        include_str!("../../schemas/embedding.v1.json"),
    ),
    (
        "embedding.v2.json",
        include_str!("../../schemas/embedding.v2.json"),
    ),
    ("image.v1.json", include_str!("../../schemas/image.v1.json")),
];

/// The most schemas one registry holds (an index is configuration, but a bound keeps a
/// mistaken one from eating memory).
pub const MAX_SCHEMAS: usize = 4096;

/// Where a schema sits in the registry: its namespace, kind and version.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SchemaId {
    /// The namespace; empty for the standard kinds.
    pub namespace: String,
    /// The kind, such as `embedding`.
    pub kind: String,
    /// The major version (the Ether's `schema_version`).
    pub major: u16,
    /// The minor version.
    pub minor: u16,
}

impl std::fmt::Display for SchemaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.namespace.is_empty() {
            write!(f, "{}/", self.namespace)?;
        }
        write!(f, "{}@{}.{}", self.kind, self.major, self.minor)
    }
}

/// Why a payload failed its schema: the JSON pointer of the first failing value and what
/// was wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadError {
    /// The JSON pointer into the Ether, such as `/payload/values/3` (`/payload` for the
    /// payload itself).
    pub pointer: String,
    /// What the schema wanted.
    pub message: String,
}

impl std::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.pointer, self.message)
    }
}

/// One JSON Schema of an Ether payload, compiled, with its `hash128`.
pub struct Schema {
    id: SchemaId,
    file: String,
    document: Value,
    hash128: [u8; 16],
    #[cfg(feature = "schema")]
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema")
            .field("id", &self.id)
            .field("file", &self.file)
            .field("hash128", &hex(&self.hash128))
            .finish()
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Schema {
    /// A schema from its JSON document. `file` names where it came from (for messages).
    ///
    /// Errors: `Error::Invalid` when the document is not a JSON Schema (draft 2020-12) that
    /// compiles (only checked with feature `schema`).
    pub fn new(id: SchemaId, file: impl Into<String>, document: Value) -> Result<Schema> {
        let file = file.into();
        #[cfg(feature = "schema")]
        let validator = jsonschema::draft202012::new(&document)
            .map_err(|e| Error::invalid(format!("schema {id} ({file}): {e}")))?;
        Ok(Schema {
            hash128: canonical::hash128(&document),
            id,
            file,
            document,
            #[cfg(feature = "schema")]
            validator,
        })
    }

    /// Where it sits in the registry.
    pub fn id(&self) -> &SchemaId {
        &self.id
    }

    /// The file it was read from (relative to the registry directory).
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The JSON Schema document.
    pub fn document(&self) -> &Value {
        &self.document
    }

    /// The first 16 bytes of SHA-256 over its RFC 8785 canonical form.
    pub fn hash128(&self) -> [u8; 16] {
        self.hash128
    }

    /// The SchemaKey a DATA frame of this schema carries.
    pub fn key(&self) -> SchemaKey {
        let mut k = SchemaKey::new(
            &self.id.namespace,
            &self.id.kind,
            self.id.major,
            self.id.minor,
        );
        k.hash128 = self.hash128;
        k
    }

    /// Whether [`Schema::validate`] checks anything (feature `schema`).
    pub const fn validates() -> bool {
        cfg!(feature = "schema")
    }

    /// Checks an Ether `payload` against the schema; the error names the JSON pointer of the
    /// first failure, from the Ether's root (`/payload/...`). Without feature `schema` every
    /// payload passes.
    pub fn validate(&self, payload: &Value) -> std::result::Result<(), PayloadError> {
        #[cfg(feature = "schema")]
        if let Err(e) = self.validator.validate(payload) {
            return Err(PayloadError {
                pointer: format!("/payload{}", e.instance_path().as_str()),
                message: e.to_string(),
            });
        }
        #[cfg(not(feature = "schema"))]
        let _ = payload;
        Ok(())
    }
}

/// The schemas a side holds (SPEC §8), by `(namespace, kind, major, minor)`.
///
/// ```
/// use xcp::schema::Registry;
///
/// let reg = Registry::standard();
/// let s = reg.latest("", "embedding", 2).expect("embedding v2 ships");
/// assert_eq!(s.id().minor, 0);
/// assert_ne!(s.hash128(), [0; 16]);
/// ```
#[derive(Default)]
pub struct Registry {
    schemas: Vec<Schema>,
    /// `(ns_hash, kind_id, major)` → indices into `schemas`, by ascending minor.
    index: HashMap<(u32, u32, u16), Vec<usize>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.schemas.iter().map(|s| s.id.to_string()))
            .finish()
    }
}

fn ns_hash(namespace: &str) -> u32 {
    SchemaKey::new(namespace, "", 0, 0).ns_hash
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The standard kinds v1 (`text`, `tokens`, `embedding`, `image`) and `embedding` v2, as
    /// shipped in the repository's `schemas/` directory (compiled in).
    pub fn standard() -> Registry {
        Registry::from_index_str(STANDARD_INDEX, |file| {
            STANDARD_FILES
                .iter()
                .find(|(f, _)| *f == file)
                .map(|(_, text)| text.to_string())
                .ok_or_else(|| Error::invalid(format!("no built-in schema file {file}")))
        })
        .expect("the shipped schemas load")
    }

    /// A registry read from a directory whose `index.json` lists
    /// `{"schemas": [{"namespace", "kind", "major", "minor", "file"}]}` (SPEC §8); each
    /// `file` is relative to the directory.
    ///
    /// Errors: `Error::Invalid` naming the file for an unreadable or bad index or schema, a
    /// file outside the directory, or a key listed twice.
    pub fn load_dir(dir: impl AsRef<Path>) -> Result<Registry> {
        let dir = dir.as_ref();
        let index_path = dir.join("index.json");
        let index = std::fs::read_to_string(&index_path)
            .map_err(|e| Error::invalid(format!("{}: {e}", index_path.display())))?;
        Registry::from_index_str(&index, |file| {
            let rel = Path::new(file);
            if rel.is_absolute()
                || rel
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(Error::invalid(format!(
                    "{}: file {file:?} is outside the registry directory",
                    index_path.display()
                )));
            }
            let p = dir.join(rel);
            std::fs::read_to_string(&p).map_err(|e| Error::invalid(format!("{}: {e}", p.display())))
        })
    }

    /// A registry from the text of an `index.json`, reading each listed file with `read`.
    pub fn from_index_str(
        index: &str,
        mut read: impl FnMut(&str) -> Result<String>,
    ) -> Result<Registry> {
        let v: Value =
            serde_json::from_str(index).map_err(|e| Error::invalid(format!("index.json: {e}")))?;
        let entries = v
            .get("schemas")
            .and_then(Value::as_array)
            .ok_or_else(|| Error::invalid("index.json: expected {\"schemas\": [...]}"))?;
        let mut reg = Registry::new();
        for (i, e) in entries.iter().enumerate() {
            let field = |k: &str| {
                e.get(k)
                    .ok_or_else(|| Error::invalid(format!("index.json: schemas[{i}].{k}: missing")))
            };
            let string = |k: &str| -> Result<String> {
                match e.get(k) {
                    None | Some(Value::Null) if k == "namespace" => Ok(String::new()),
                    _ => field(k)?.as_str().map(str::to_string).ok_or_else(|| {
                        Error::invalid(format!("index.json: schemas[{i}].{k}: expected a string"))
                    }),
                }
            };
            let version = |k: &str| -> Result<u16> {
                field(k)?
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or_else(|| {
                        Error::invalid(format!("index.json: schemas[{i}].{k}: expected 0..=65535"))
                    })
            };
            let id = SchemaId {
                namespace: string("namespace")?,
                kind: string("kind")?,
                major: version("major")?,
                minor: version("minor")?,
            };
            if id.kind.is_empty() || id.major == 0 {
                return Err(Error::invalid(format!(
                    "index.json: schemas[{i}]: a kind and a major version >= 1 are required"
                )));
            }
            let file = string("file")?;
            let text = read(&file)?;
            let document: Value =
                serde_json::from_str(&text).map_err(|e| Error::invalid(format!("{file}: {e}")))?;
            reg.insert(Schema::new(id, file, document)?)?;
        }
        Ok(reg)
    }

    /// Adds a schema. Errors: `Error::Invalid` when its key is already held, or the registry
    /// holds [`MAX_SCHEMAS`].
    pub fn insert(&mut self, schema: Schema) -> Result<()> {
        if self.schemas.len() >= MAX_SCHEMAS {
            return Err(Error::invalid(format!(
                "registry: more than {MAX_SCHEMAS} schemas"
            )));
        }
        let id = &schema.id;
        let key = (ns_hash(&id.namespace), fnv1a32(&id.kind), id.major);
        let slot = self.index.entry(key).or_default();
        if slot.iter().any(|&i| self.schemas[i].id.minor == id.minor) {
            return Err(Error::invalid(format!("registry: {id} listed twice")));
        }
        slot.push(self.schemas.len());
        let schemas = &self.schemas;
        let minor = id.minor;
        slot.sort_by_key(|&i| schemas.get(i).map_or(minor, |s| s.id.minor));
        self.schemas.push(schema);
        Ok(())
    }

    /// Every schema, in the order added.
    pub fn iter(&self) -> impl Iterator<Item = &Schema> {
        self.schemas.iter()
    }

    /// How many schemas it holds.
    pub fn len(&self) -> usize {
        self.schemas.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.schemas.is_empty()
    }

    fn by_key(&self, ns_hash: u32, kind_id: u32, major: u16) -> impl Iterator<Item = &Schema> {
        self.index
            .get(&(ns_hash, kind_id, major))
            .into_iter()
            .flatten()
            .map(|&i| &self.schemas[i])
    }

    /// The schema of exactly this key's namespace, kind, major and minor.
    pub fn get_key(&self, key: &SchemaKey) -> Option<&Schema> {
        self.by_key(key.ns_hash, key.kind_id, key.major)
            .find(|s| s.id.minor == key.minor)
    }

    /// The schema of the highest minor version held of `(namespace, kind, major)`.
    pub fn latest(&self, namespace: &str, kind: &str, major: u16) -> Option<&Schema> {
        self.by_key(ns_hash(namespace), fnv1a32(kind), major).last()
    }

    /// The schema to check a message of `key` with: its own minor if held, else the highest
    /// minor held below it (a higher minor only adds fields, SPEC §8); `None` when only
    /// higher minors, or nothing, are held.
    pub fn for_key(&self, key: &SchemaKey) -> Option<&Schema> {
        self.by_key(key.ns_hash, key.kind_id, key.major)
            .filter(|s| s.id.minor <= key.minor)
            .last()
    }

    /// The name of a kind id among the schemas held, if any.
    pub fn kind_name(&self, kind_id: u32) -> Option<&str> {
        self.schemas
            .iter()
            .find(|s| fnv1a32(&s.id.kind) == kind_id)
            .map(|s| s.id.kind.as_str())
    }

    /// Fills `minor` and `hash128` of a sender's key (SPEC §8): when its hash is zero, from
    /// the schema of its minor if held, else (for minor 0) the highest minor held. A key of
    /// a schema not held is left as it is.
    pub fn fill_key(&self, key: &mut SchemaKey) {
        if key.hash128 != [0; 16] {
            return;
        }
        let found = self.get_key(key).or_else(|| match key.minor {
            0 => self.by_key(key.ns_hash, key.kind_id, key.major).last(),
            _ => None,
        });
        if let Some(s) = found {
            key.minor = s.id.minor;
            key.hash128 = s.hash128;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn standard_kinds_load() {
        let reg = Registry::standard();
        assert_eq!(reg.len(), 5);
        for (kind, major) in [
            ("text", 1),
            ("tokens", 1),
            ("embedding", 1),
            ("embedding", 2),
            ("image", 1),
        ] {
            let s = reg
                .latest("", kind, major)
                .unwrap_or_else(|| panic!("{kind}@{major}"));
            assert_eq!(s.key().kind_id, fnv1a32(kind));
            assert_eq!(s.key().ns_hash, 0);
        }
        assert!(reg.latest("", "text", 2).is_none());
        assert_eq!(reg.kind_name(fnv1a32("image")), Some("image"));
    }

    /// The check values of `hash128` for the shipped schemas: a change to a schema file
    /// changes its hash, and peers holding the old one answer "schema hash differs". (Cross-
    /// checked with Python: for these files `json.dumps(sort_keys=True, separators=(",", ":"),
    /// ensure_ascii=False)` is the RFC 8785 form.)
    #[test]
    fn shipped_hash128_pinned() {
        let reg = Registry::standard();
        let got: Vec<(String, String)> = reg
            .iter()
            .map(|s| (s.id().to_string(), hex(&s.hash128())))
            .collect();
        let want = [
            ("text@1.0", "b60674025fb334833be5aef87f804d74"),
            ("tokens@1.0", "60f34ae56bfa7dd894e25a355282ca81"),
            ("embedding@1.0", "a10f582e7ebca8a7e6f3ab0cd3f2c490"),
            ("embedding@2.0", "c58835518f1feb54e36bce498b79ea09"),
            ("image@1.0", "fbff33e6e726c22c265eb88768d55c7f"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    /// The shipped directory loads to the same schemas as the built-in registry.
    #[test]
    fn shipped_directory_is_the_builtin() {
        let dir = Registry::load_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas")).unwrap();
        let ids = |r: &Registry| -> Vec<(SchemaId, [u8; 16])> {
            r.iter().map(|s| (s.id().clone(), s.hash128())).collect()
        };
        assert_eq!(ids(&dir), ids(&Registry::standard()));
    }

    #[test]
    fn hash_ignores_formatting_and_key_order() {
        let a = Schema::new(
            SchemaId {
                namespace: String::new(),
                kind: "k".into(),
                major: 1,
                minor: 0,
            },
            "a",
            json!({"type": "object", "required": ["x"]}),
        )
        .unwrap();
        let b_doc: Value =
            serde_json::from_str("{ \"required\" : [ \"x\" ],\n \"type\":\"object\" }").unwrap();
        let b = Schema::new(a.id().clone(), "b", b_doc).unwrap();
        assert_eq!(a.hash128(), b.hash128());
    }

    #[test]
    fn load_dir_and_lookup() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("index.json"),
            r#"{"schemas":[{"namespace":"acme","kind":"pose","major":1,"minor":2,"file":"pose.json"},
                           {"namespace":"acme","kind":"pose","major":1,"minor":0,"file":"pose.json"}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("pose.json"),
            r#"{"type":"object","required":["x"],"properties":{"x":{"type":"number"}}}"#,
        )
        .unwrap();
        let reg = Registry::load_dir(dir.path()).unwrap();
        assert_eq!(reg.latest("acme", "pose", 1).unwrap().id().minor, 2);
        let mut key = SchemaKey::new("acme", "pose", 1, 0);
        assert_eq!(reg.for_key(&key).unwrap().id().minor, 0);
        key.minor = 1;
        assert_eq!(reg.for_key(&key).unwrap().id().minor, 0);
        key.minor = 7;
        assert_eq!(reg.for_key(&key).unwrap().id().minor, 2);
        let mut k0 = SchemaKey::new("acme", "pose", 1, 0);
        reg.fill_key(&mut k0);
        assert_eq!(k0.minor, 0);
        assert_ne!(k0.hash128, [0; 16]);
        assert!(reg.latest("", "pose", 1).is_none());

        std::fs::write(
            dir.path().join("index.json"),
            r#"{"schemas":[{"kind":"pose","major":1,"minor":0,"file":"../x.json"}]}"#,
        )
        .unwrap();
        let e = Registry::load_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
        std::fs::write(
            dir.path().join("index.json"),
            r#"{"schemas":[{"kind":"pose","major":1,"minor":0,"file":"pose.json"},{"kind":"pose","major":1,"minor":0,"file":"pose.json"}]}"#,
        )
        .unwrap();
        let e = Registry::load_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
    }

    #[cfg(feature = "schema")]
    #[test]
    fn validation_names_the_pointer() {
        let reg = Registry::standard();
        let s = reg.latest("", "embedding", 1).unwrap();
        assert!(s.validate(&json!({"values": [1.0, 2.0], "dim": 2})).is_ok());
        let e = s
            .validate(&json!({"values": [1.0, "two"], "dim": 2}))
            .unwrap_err();
        assert_eq!(e.pointer, "/payload/values/1");
        let e = reg
            .latest("", "text", 1)
            .unwrap()
            .validate(&json!({"text": 5}))
            .unwrap_err();
        assert_eq!(e.pointer, "/payload/text");
        let e = reg
            .latest("", "text", 1)
            .unwrap()
            .validate(&json!({}))
            .unwrap_err();
        assert_eq!(e.pointer, "/payload");
        assert!(e.message.contains("text"), "{e}");
    }

    /// What xcp itself produces passes its own schemas.
    #[cfg(feature = "schema")]
    #[test]
    fn own_ethers_pass() {
        let reg = Registry::standard();
        let check = |e: &crate::Ether| {
            let s = reg.latest("", &e.kind, e.schema_version as u16).unwrap();
            s.validate(&Value::Object(e.payload.clone())).unwrap();
        };
        check(&crate::Ether::text("hi"));
        check(&crate::Ether::embedding(&[0.5, -1.0]));
        let obj = |v: Value| v.as_object().unwrap().clone();
        check(&crate::Ether::new(
            "tokens",
            obj(json!({"token_ids": [1, 2, 50256], "mask": [1, 1, 0]})),
        ));
        check(&crate::Ether::new(
            "tokens",
            obj(json!({"token_ids": [1], "mask": [true]})),
        ));
        check(&crate::Ether::new(
            "image",
            obj(json!({"height": 2, "width": 2, "channels": 1, "data": "AAEC"})),
        ));
    }
}
