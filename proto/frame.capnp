# XCP v0.2 FrameHeader (SPEC §2.1). The Rust bindings in src/wire/frame_capnp.rs are generated
# from this file by scripts/regen-capnp.sh and checked in; the build does not need capnp.
@0xbf514fc46d4d410b;

struct FrameHeader {
  channelId  @0 :UInt32;     # logical stream; frames of one channel stay ordered
  msgType    @1 :UInt16;     # §4; 0x0000..0x00FF control, 0x0100 DATA
  bodyCodec  @2 :UInt16;     # §5
  schemaKey  @3 :SchemaKey;  # the Ether schema of a DATA body
  msgId      @4 :UInt64;     # unique per sender per connection, never reused; chunks share it
  inReplyTo  @5 :UInt64;     # correlation id, 0 if none
  tags       @6 :List(Tag);  # free-form key/value
}

struct SchemaKey {
  nsHash   @0 :UInt32;       # FNV-1a 32 of the namespace string
  kindId   @1 :UInt32;       # FNV-1a 32 of the kind string
  major    @2 :UInt16;
  minor    @3 :UInt16;
  hash128  @4 :Data;         # 16 bytes: first 128 bits of SHA-256 of the canonical schema JSON
}

struct Tag { key @0 :Text; val @1 :Text; }
