//! Pins the checked-in Cap'n Proto module (`frame_capnp.rs`) to its schema
//! (`proto/frame.capnp`): the build never runs the capnp compiler, so a schema edited without
//! `scripts/regen-capnp.sh` would otherwise go unnoticed until a peer could not read us.
//!
//! From the schema text this test derives what the compiler would: each struct's node id (the
//! first 8 bytes of MD5 over the parent's id, little-endian, and the struct's name, with the
//! top bit set) and its layout (Cap'n Proto's allocation in ordinal order: data fields packed
//! into the smallest hole that fits, pointers in order). It then checks the module: the
//! `TYPE_ID` and `STRUCT_SIZE` it exports (read through the capnp traits, so the values the
//! runtime uses), and the data offset or pointer index of every field's getter.

use capnp::traits::{HasStructSize, HasTypeId};

use super::frame_capnp;

const SCHEMA: &str = include_str!("../../proto/frame.capnp");
const MODULE: &str = include_str!("frame_capnp.rs");

/// Where a field lives in its struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// A data field: its Rust type and its offset in units of its own size.
    Data(&'static str, u32),
    /// A pointer field: its index in the pointer section.
    Pointer(u32),
}

#[derive(Debug)]
struct Field {
    name: String,
    ordinal: u32,
    ty: String,
}

#[derive(Debug)]
struct Struct {
    name: String,
    fields: Vec<Field>,
}

/// The file id and the structs of a schema with flat structs (no groups, unions, nesting or
/// annotations, which frame.capnp does not use; anything else fails the parse loudly).
fn parse(schema: &str) -> (u64, Vec<Struct>) {
    let text: String = schema
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut file_id = None;
    let mut structs = Vec::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find(|c: char| !c.is_whitespace()) {
        rest = &rest[i..];
        if let Some(r) = rest.strip_prefix('@') {
            let end = r.find(';').expect("file id ends with ;");
            let hex = r[..end].trim().trim_start_matches("0x");
            file_id = Some(u64::from_str_radix(hex, 16).expect("file id is hex"));
            rest = &r[end + 1..];
        } else if let Some(r) = rest.strip_prefix("struct") {
            let open = r.find('{').expect("struct body");
            let close = r.find('}').expect("struct body ends");
            let name = r[..open].trim().to_string();
            let mut fields = Vec::new();
            for decl in r[open + 1..close].split(';') {
                let decl = decl.trim();
                if decl.is_empty() {
                    continue;
                }
                let (name, rest) = decl.split_once('@').expect("field @ordinal");
                let (ordinal, ty) = rest.split_once(':').expect("field :Type");
                fields.push(Field {
                    name: name.trim().to_string(),
                    ordinal: ordinal.trim().parse().expect("ordinal"),
                    ty: ty.trim().to_string(),
                });
            }
            fields.sort_by_key(|f| f.ordinal);
            structs.push(Struct { name, fields });
            rest = &r[close + 1..];
        } else {
            panic!("frame.capnp: this test reads only a file id and flat structs: {rest:.40}");
        }
    }
    (file_id.expect("a file id"), structs)
}

/// The id the compiler gives a declaration `name` inside the node `parent`.
fn child_id(parent: u64, name: &str) -> u64 {
    let mut input = parent.to_le_bytes().to_vec();
    input.extend_from_slice(name.as_bytes());
    let digest = md5::compute(&input);
    u64::from_be_bytes(digest.0[..8].try_into().unwrap()) | 1 << 63
}

/// log2 of a data type's size in bits and its Rust type, or `None` for a pointer type.
fn data_type(ty: &str) -> Option<(u32, &'static str)> {
    Some(match ty {
        "Bool" => (0, "bool"),
        "Int8" => (3, "i8"),
        "UInt8" => (3, "u8"),
        "Int16" => (4, "i16"),
        "UInt16" => (4, "u16"),
        "Int32" => (5, "i32"),
        "UInt32" => (5, "u32"),
        "Float32" => (5, "f32"),
        "Int64" => (6, "i64"),
        "UInt64" => (6, "u64"),
        "Float64" => (6, "f64"),
        _ => return None,
    })
}

/// Cap'n Proto's struct layout: `(slots by field, data words, pointers)`.
fn layout(s: &Struct) -> (Vec<(String, Slot)>, u16, u16) {
    // holes[lg] = offset (in units of 2^lg bits) of a free hole of that size, 0 if none.
    let mut holes = [0u32; 6];
    fn take(holes: &mut [u32; 6], lg: usize) -> Option<u32> {
        if lg >= holes.len() {
            return None;
        }
        if holes[lg] != 0 {
            return Some(std::mem::take(&mut holes[lg]));
        }
        let bigger = take(holes, lg + 1)?;
        holes[lg] = bigger * 2 + 1;
        Some(bigger * 2)
    }
    let (mut words, mut pointers) = (0u16, 0u16);
    let mut slots = Vec::new();
    for f in &s.fields {
        if f.ty == "Void" {
            continue;
        }
        let slot = match data_type(&f.ty) {
            Some((lg, rust)) => {
                let lg = lg as usize;
                let offset = take(&mut holes, lg).unwrap_or_else(|| {
                    let offset = u32::from(words) << (6 - lg);
                    words += 1;
                    // The rest of the new word becomes holes of each larger size.
                    let (mut size, mut at) = (lg, offset + 1);
                    while size < 6 {
                        holes[size] = at;
                        size += 1;
                        at = at.div_ceil(2);
                    }
                    offset
                });
                Slot::Data(rust, offset)
            }
            None => {
                pointers += 1;
                Slot::Pointer(u32::from(pointers) - 1)
            }
        };
        slots.push((f.name.clone(), slot));
    }
    (slots, words, pointers)
}

/// `channelId` → `channel_id`.
fn snake(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            if !out.is_empty() {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The slot the generated Reader's getter for `field` reads, found in the module's text.
fn generated_slot(module: &str, strukt: &str, field: &str) -> Option<Slot> {
    let body_start = module.find(&format!("pub mod {} {{", snake(strukt)))?;
    let body = &module[body_start..];
    let reader = &body[body.find("impl<'a> Reader<'a> {")?..];
    let getter = &reader[reader.find(&format!("pub fn get_{}(", snake(field)))?..];
    let getter = &getter[..getter.find("#[inline]").unwrap_or(getter.len())];
    if let Some(i) = getter.find("get_data_field::<") {
        let rest = &getter[i + "get_data_field::<".len()..];
        let (ty, rest) = rest.split_once(">(")?;
        let offset = rest.split_once(')')?.0.trim().parse().ok()?;
        let ty = data_type_name(ty)?;
        return Some(Slot::Data(ty, offset));
    }
    if let Some(i) = getter.find("get_pointer_field(") {
        let rest = &getter[i + "get_pointer_field(".len()..];
        return Some(Slot::Pointer(rest.split_once(')')?.0.trim().parse().ok()?));
    }
    None
}

fn data_type_name(ty: &str) -> Option<&'static str> {
    [
        "bool", "i8", "u8", "i16", "u16", "i32", "u32", "f32", "i64", "u64", "f64",
    ]
    .into_iter()
    .find(|t| *t == ty)
}

/// `TYPE_ID` and `STRUCT_SIZE` of a generated struct, as the capnp runtime sees them.
fn generated(name: &str) -> (u64, u16, u16) {
    fn of<T: HasTypeId + HasStructSize>() -> (u64, u16, u16) {
        (T::TYPE_ID, T::STRUCT_SIZE.data, T::STRUCT_SIZE.pointers)
    }
    match name {
        "FrameHeader" => of::<frame_capnp::frame_header::Builder<'static>>(),
        "SchemaKey" => of::<frame_capnp::schema_key::Builder<'static>>(),
        "Tag" => of::<frame_capnp::tag::Builder<'static>>(),
        other => panic!(
            "frame.capnp declares struct {other}, which the checked-in module lacks: run \
             scripts/regen-capnp.sh (and name it here)"
        ),
    }
}

#[test]
fn the_checked_in_module_matches_frame_capnp() {
    let (file_id, structs) = parse(SCHEMA);
    assert_eq!(
        file_id, 0xbf51_4fc4_6d4d_410b,
        "the file id SPEC §2.1 gives"
    );
    let names: Vec<&str> = structs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["FrameHeader", "SchemaKey", "Tag"]);
    let regen =
        "proto/frame.capnp and src/wire/frame_capnp.rs disagree: run scripts/regen-capnp.sh";
    for s in &structs {
        let (id, data, pointers) = generated(&s.name);
        assert_eq!(
            id,
            child_id(file_id, &s.name),
            "{}: node id; {regen}",
            s.name
        );
        let (slots, want_data, want_pointers) = layout(s);
        assert_eq!(
            (data, pointers),
            (want_data, want_pointers),
            "{}: struct size (data words, pointers); {regen}",
            s.name
        );
        for (field, slot) in slots {
            assert_eq!(
                generated_slot(MODULE, &s.name, &field),
                Some(slot),
                "{}.{field}: where the getter reads; {regen}",
                s.name
            );
        }
        // No getter in the module for a field the schema does not have.
        let body = &MODULE[MODULE
            .find(&format!("pub mod {} {{", snake(&s.name)))
            .unwrap()..];
        let reader = &body[body.find("impl<'a> Reader<'a> {").unwrap()..];
        let reader = &reader[..reader.find("\n    }\n").unwrap_or(reader.len())];
        let getters = reader.matches("pub fn get_").count();
        assert_eq!(getters, s.fields.len(), "{}: getters; {regen}", s.name);
    }
}

/// The layout rules themselves, worked by hand: a UInt64 takes word 0; a Bool then opens
/// word 1 at bit 64, leaving holes of every larger size in it; a UInt32, a UInt16 and a UInt8
/// fill those holes (32-bit offset 3, 16-bit offset 5, 8-bit offset 9) instead of opening a
/// third word; a Text is pointer 0, and a Void takes no space.
#[test]
fn the_layout_rules_pack_into_holes() {
    let (_, structs) = parse(
        "@0xbf514fc46d4d410b;\nstruct S { a @0 :UInt64; b @1 :Bool; c @2 :UInt32; d @3 :UInt16; \
         e @4 :UInt8; f @5 :Text; g @6 :Void; }",
    );
    let (slots, words, pointers) = layout(&structs[0]);
    let slot = |n: &str| slots.iter().find(|(f, _)| f == n).map(|(_, s)| *s);
    assert_eq!(slot("a"), Some(Slot::Data("u64", 0)));
    assert_eq!(slot("b"), Some(Slot::Data("bool", 64)));
    assert_eq!(slot("c"), Some(Slot::Data("u32", 3)));
    assert_eq!(slot("d"), Some(Slot::Data("u16", 5)));
    assert_eq!(slot("e"), Some(Slot::Data("u8", 9)));
    assert_eq!(slot("f"), Some(Slot::Pointer(0)));
    assert_eq!(slot("g"), None, "Void takes no space");
    assert_eq!((words, pointers), (2, 1));
}
