//! Byte-splicing JSON transforms.
//!
//! The DOM path parses every body into a `serde_json::Value`, replaces the values at the
//! configured JSONPaths and serializes the tree again. Most of that work is wasted: the
//! document is only *read* everywhere except at a handful of locations. This module instead
//!
//! 1. [`scan`]s the body once into a flat, pre-order span index (one arena `Vec`, no
//!    per-value allocation), validating it as strictly as the DOM path did;
//! 2. evaluates the configured paths on that index ([`CompiledPath::locate`]) with the same
//!    results (and the same post-processing) as `jsonpath_rust` on a `Value`;
//! 3. [`splice`]s the replacements into the original bytes, so everything that is not replaced
//!    stays byte-for-byte as the client sent it.
//!
//! Input is attacker controlled: nothing here recurses on the input's nesting, nothing panics
//! on any input, and errors carry positions only, never content.

use std::borrow::Cow;
use std::ops::Range;

use jsonpath_rust::parser::model::{JpQuery, Segment, Selector};

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a body was refused. Positions only: a message must never echo (possibly secret) input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error("malformed JSON at line {line} column {column}")]
    Syntax { line: usize, column: usize },
    #[error("duplicate object key at line {line} column {column}")]
    DuplicateKey { line: usize, column: usize },
    #[error("JSON nested deeper than {0} levels")]
    TooDeep(usize),
}

/// Why [`splice`] refused a set of edits. These are caller bugs, not input problems, but they
/// are reported rather than panicking so that a bad edit list can never take the proxy down.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpliceError {
    #[error("edit range {start}..{end} does not lie within the {len}-byte source")]
    OutOfBounds {
        start: usize,
        end: usize,
        len: usize,
    },
    #[error("edit ranges overlap at byte {0}")]
    Overlap(usize),
}

// ---------------------------------------------------------------------------------------------
// The span index
// ---------------------------------------------------------------------------------------------

/// What kind of JSON value a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Object,
    Array,
    String,
    Number,
    Bool,
    Null,
}

impl Kind {
    /// Objects and arrays: the only nodes that have children.
    pub fn is_container(self) -> bool {
        matches!(self, Kind::Object | Kind::Array)
    }
}

/// Handle of one value in a [`Scanned`] document (its position in the pre-order arena).
///
/// Ids compare in document order, and an ancestor always has a smaller id than its
/// descendants. An id is only meaningful for the `Scanned` that produced it: the accessors
/// panic if given an id from a different (larger) document, exactly like slice indexing;
/// no *input* can cause that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(u32);

impl NodeId {
    /// Position in the pre-order arena (0 is the root).
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Set on a member node whose key contains a backslash (so it must be unescaped before use).
const KEY_ESCAPED: u8 = 1;
/// Set on a string node whose contents contain a backslash.
const STR_ESCAPED: u8 = 2;

/// One value. Offsets are `u32` to keep the arena small (24 bytes a node); [`scan`] refuses
/// inputs that do not fit rather than truncating.
#[derive(Debug, Clone, Copy)]
struct Node {
    /// Value span: from the first byte of the value to just past its last byte (quotes and
    /// brackets included).
    start: u32,
    end: u32,
    /// For object members: the key, raw, without its quotes. `0..0` otherwise.
    key_start: u32,
    key_end: u32,
    /// Arena index just past this node's subtree: the next sibling, if there is one.
    next: u32,
    kind: Kind,
    flags: u8,
}

/// A validated document and its span index.
///
/// Borrows the source: spans index into it, and splicing reads it again.
#[derive(Debug, Clone)]
pub struct Scanned<'a> {
    /// The whole source. A document that scans is valid UTF-8 throughout (strings were
    /// validated, everything else is ASCII), so holding it as `str` lets keys and strings be
    /// handed out as `&str` without re-validating them.
    src: &'a str,
    nodes: Vec<Node>,
}

/// The key under which [`Scanned::children`] found a child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildKey<'s> {
    /// Member of an object, unescaped.
    Key(Cow<'s, str>),
    /// Element of an array.
    Index(usize),
}

/// One step of a location: a member name (unescaped) or an array index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    Key(String),
    Index(usize),
}

impl<'a> Scanned<'a> {
    fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    /// The top-level value.
    pub fn root(&self) -> NodeId {
        NodeId(0)
    }

    /// The source this index describes.
    pub fn source(&self) -> &'a str {
        self.src
    }

    /// Number of values in the document.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a scanned document has at least its root value.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn kind(&self, node: NodeId) -> Kind {
        self.node(node).kind
    }

    /// Byte range of the value in the source (quotes and brackets included): the range to
    /// replace when splicing a new value in.
    pub fn span(&self, node: NodeId) -> Range<usize> {
        let n = self.node(node);
        n.start as usize..n.end as usize
    }

    /// The value's source bytes.
    pub fn raw(&self, node: NodeId) -> &'a [u8] {
        self.src.as_bytes().get(self.span(node)).unwrap_or_default()
    }

    /// The value's source text (the same bytes as [`Scanned::raw`]).
    pub fn raw_str(&self, node: NodeId) -> &'a str {
        self.src.get(self.span(node)).unwrap_or_default()
    }

    /// The member name under which `node` sits in its parent object, unescaped; `None` for the
    /// root and for array elements.
    pub fn key(&self, node: NodeId) -> Option<Cow<'a, str>> {
        let n = self.node(node);
        if n.key_end == 0 {
            return None;
        }
        let raw = self.src.get(n.key_start as usize..n.key_end as usize)?;
        Some(if n.flags & KEY_ESCAPED != 0 {
            unescape_str(raw)
        } else {
            Cow::Borrowed(raw)
        })
    }

    /// The unescaped contents of a string value; `None` if `node` is not a string.
    pub fn string_value(&self, node: NodeId) -> Option<Cow<'a, str>> {
        let n = self.node(node);
        if n.kind != Kind::String {
            return None;
        }
        let raw = self
            .src
            .get(n.start as usize + 1..(n.end as usize).saturating_sub(1))?;
        Some(if n.flags & STR_ESCAPED != 0 {
            unescape_str(raw)
        } else {
            Cow::Borrowed(raw)
        })
    }

    /// Ids of the direct children, in document order (cheap: no key decoding).
    pub fn child_ids(&self, node: NodeId) -> ChildIds<'_> {
        let n = self.node(node);
        let (cur, end) = if n.kind.is_container() {
            (node.0 + 1, n.next)
        } else {
            (0, 0)
        };
        ChildIds {
            nodes: &self.nodes,
            cur,
            end,
        }
    }

    /// Direct children in document order: `(Key(name), child)` for an object,
    /// `(Index(i), child)` for an array, nothing for a scalar.
    pub fn children(&self, node: NodeId) -> Children<'_, 'a> {
        Children {
            doc: self,
            ids: self.child_ids(node),
            is_object: self.kind(node) == Kind::Object,
            index: 0,
        }
    }

    /// The value of member `name` of an object (compared after unescaping the document's
    /// keys). `None` if `node` is not an object or has no such member. Keys are unique in a
    /// scanned document, so there is at most one.
    pub fn member(&self, node: NodeId, name: &str) -> Option<NodeId> {
        if self.kind(node) != Kind::Object {
            return None;
        }
        self.child_ids(node).find(|&c| {
            let n = self.node(c);
            let raw = self
                .src
                .get(n.key_start as usize..n.key_end as usize)
                .unwrap_or_default();
            if n.flags & KEY_ESCAPED == 0 {
                raw == name
            } else {
                unescape_str(raw) == name
            }
        })
    }

    /// Element `i` of an array; `None` if `node` is not an array or is too short.
    pub fn index(&self, node: NodeId, i: usize) -> Option<NodeId> {
        if self.kind(node) != Kind::Array {
            return None;
        }
        self.child_ids(node).nth(i)
    }

    /// Whether `inner` is `outer` or lies inside `outer`'s subtree.
    pub fn contains(&self, outer: NodeId, inner: NodeId) -> bool {
        outer <= inner && inner.0 < self.node(outer).next
    }

    /// The path from the root to `node`, as the steps of a normalized path
    /// (`$['a'][3]` is `[Key("a"), Index(3)]`).
    pub fn location(&self, node: NodeId) -> Vec<Step> {
        let mut steps = Vec::new();
        let mut cur = self.root();
        while cur != node {
            let is_object = self.kind(cur) == Kind::Object;
            let found = self
                .child_ids(cur)
                .enumerate()
                .find(|&(_, c)| self.contains(c, node));
            let Some((i, child)) = found else { break };
            steps.push(if is_object {
                Step::Key(self.key(child).unwrap_or_default().into_owned())
            } else {
                Step::Index(i)
            });
            cur = child;
        }
        steps
    }
}

impl<'a> Scanned<'a> {
    /// Every object member's name in the document (unescaped), in document order.
    pub fn member_names(&self) -> impl Iterator<Item = Cow<'a, str>> + '_ {
        (0..self.nodes.len() as u32).filter_map(|i| self.key(NodeId(i)))
    }
}

impl Scanned<'_> {
    /// The locations of many nodes at once. One pass over the arena finds every node's parent
    /// and position; each location is then a walk up: O(size + Σ depth), where calling
    /// [`location`](Self::location) per node costs the siblings before each one (quadratic
    /// over the elements of a long array).
    pub fn locations(&self, nodes: &[NodeId]) -> Vec<Vec<Step>> {
        const NONE: u32 = u32::MAX;
        let n = self.nodes.len();
        let mut parent = vec![NONE; n];
        let mut position = vec![0u32; n];
        // The containers that contain the current node, innermost last, with the position
        // their next direct child gets.
        let mut open: Vec<(u32, u32)> = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let i = i as u32;
            while open
                .last()
                .is_some_and(|&(c, _)| i >= self.nodes[c as usize].next)
            {
                open.pop();
            }
            if let Some((c, next_position)) = open.last_mut() {
                parent[i as usize] = *c;
                position[i as usize] = *next_position;
                *next_position += 1;
            }
            if node.kind.is_container() {
                open.push((i, 0));
            }
        }
        nodes
            .iter()
            .map(|&node| {
                let mut steps = Vec::new();
                let mut cur = node.0;
                while let Some(&p) = parent.get(cur as usize).filter(|&&p| p != NONE) {
                    steps.push(if self.nodes[p as usize].kind == Kind::Object {
                        Step::Key(self.key(NodeId(cur)).unwrap_or_default().into_owned())
                    } else {
                        Step::Index(position[cur as usize] as usize)
                    });
                    cur = p;
                }
                steps.reverse();
                steps
            })
            .collect()
    }
}

/// The path from the root of `doc` to `node`; see [`Scanned::location`].
pub fn location(doc: &Scanned<'_>, node: NodeId) -> Vec<Step> {
    doc.location(node)
}

/// Iterator over the ids of a container's direct children.
#[derive(Debug, Clone)]
pub struct ChildIds<'s> {
    nodes: &'s [Node],
    cur: u32,
    end: u32,
}

impl Iterator for ChildIds<'_> {
    type Item = NodeId;

    fn next(&mut self) -> Option<NodeId> {
        if self.cur >= self.end {
            return None;
        }
        let id = NodeId(self.cur);
        // Jumping over the subtree; `next` is always greater than the node's own index, so
        // this terminates even on a corrupted arena.
        self.cur = self
            .nodes
            .get(self.cur as usize)
            .map_or(self.end, |n| n.next.max(self.cur + 1));
        Some(id)
    }
}

/// Iterator over a container's direct children with their keys or indexes.
#[derive(Debug, Clone)]
pub struct Children<'s, 'a> {
    doc: &'s Scanned<'a>,
    ids: ChildIds<'s>,
    is_object: bool,
    index: usize,
}

impl<'a> Iterator for Children<'_, 'a> {
    type Item = (ChildKey<'a>, NodeId);

    fn next(&mut self) -> Option<Self::Item> {
        let id = self.ids.next()?;
        let key = if self.is_object {
            ChildKey::Key(self.doc.key(id).unwrap_or_default())
        } else {
            ChildKey::Index(self.index)
        };
        self.index += 1;
        Some((key, id))
    }
}

// ---------------------------------------------------------------------------------------------
// Scanner
// ---------------------------------------------------------------------------------------------

/// Scans `src` as exactly one JSON value (RFC 8259) surrounded by optional whitespace.
///
/// Accepts exactly what `serde_json::from_slice::<serde_json::Value>` (with
/// `arbitrary_precision`) accepts, except that it also refuses:
/// - duplicate keys in an object, compared after unescaping ([`JsonError::DuplicateKey`]):
///   serde_json silently keeps the last one while an upstream may keep the first, so an
///   attacker could smuggle a clear-text value past the encryption of the other;
/// - nesting deeper than `max_depth` objects/arrays, the top-level container being depth 1
///   ([`JsonError::TooDeep`]);
/// - an object whose *first* key is serde_json's private marker
///   `$serde_json::private::Number` (or `…::RawValue`): serde_json does not parse such an
///   object as an object at all (it turns `{"$serde_json::private::Number":"1"}` into the
///   number `1`), so the span index and the DOM would disagree about its structure;
/// - inputs of 4 GiB or more (offsets are 32-bit).
///
/// Never recurses, whatever `max_depth` is. Time is linear in the input except for the
/// duplicate-key check of objects with more than 32 members, which sorts their keys
/// (O(n log n)). Memory: the arena takes 24 bytes per value, so a body of tiny values
/// (`[0,0,0,…]`) costs up to 12 times its size; the proxy's body-size limit bounds that.
pub fn scan(src: &[u8], max_depth: usize) -> Result<Scanned<'_>, JsonError> {
    scan_with_limit(src, max_depth, u32::MAX as usize)
}

/// [`scan`] with a configurable size limit, so the limit can be tested without 4 GiB inputs.
fn scan_with_limit(src: &[u8], max_depth: usize, limit: usize) -> Result<Scanned<'_>, JsonError> {
    if src.len() > limit.min(u32::MAX as usize) {
        return Err(syntax_at(src, limit));
    }
    let mut scanner = Scanner {
        src,
        pos: 0,
        max_depth,
        // About one node per 8–12 bytes in typical documents: sized so that a body is
        // scanned without regrowing the arena, capped so that a large body made of a few long
        // strings does not reserve memory it will never use.
        nodes: Vec::with_capacity((src.len() / 8 + 8).min(1 << 16)),
        frames: Vec::with_capacity(16),
        keys: Vec::with_capacity(64),
        unescaped_keys: Vec::new(),
        pending_key: (0, 0, 0),
    };
    scanner.run()?;
    // Deferred UTF-8 check of the whole input: outside strings the grammar only admits ASCII,
    // so this is exactly the strings' validation, done once with std's fast path instead of
    // string by string, and it yields the `&str` the accessors hand out.
    let text = std::str::from_utf8(src).map_err(|e| syntax_at(src, e.valid_up_to()))?;
    Ok(Scanned {
        src: text,
        nodes: scanner.nodes,
    })
}

/// Checks values as [`scan`] does, keeping its buffers from one value to the next, so that
/// checking many small values (the plaintexts of a body's fields) allocates nothing after the
/// first. The buffers can hold pieces of what was checked (unescaped keys): they are zeroized
/// when the validator goes.
#[derive(Default)]
pub struct Validator {
    nodes: Vec<Node>,
    frames: Vec<Frame>,
    keys: Vec<KeyEntry>,
    unescaped_keys: Vec<u8>,
}

impl Validator {
    /// Whether `src` is one JSON value that [`scan`] accepts.
    pub fn check(&mut self, src: &[u8], max_depth: usize) -> Result<(), JsonError> {
        if src.len() > u32::MAX as usize {
            return Err(syntax_at(src, u32::MAX as usize));
        }
        // A string alone (most field values): checked in place, with no node built. Anything
        // else, or a string followed by more (whitespace, garbage), takes the full check.
        if src.first() == Some(&b'"') {
            let mut scanner = Scanner {
                src,
                pos: 0,
                max_depth,
                nodes: Vec::new(),
                frames: Vec::new(),
                keys: Vec::new(),
                unescaped_keys: Vec::new(),
                pending_key: (0, 0, 0),
            };
            if scanner.scan_string().is_ok() && scanner.pos == src.len() {
                std::str::from_utf8(src).map_err(|e| syntax_at(src, e.valid_up_to()))?;
                return Ok(());
            }
        }
        let mut scanner = Scanner {
            src,
            pos: 0,
            max_depth,
            nodes: std::mem::take(&mut self.nodes),
            frames: std::mem::take(&mut self.frames),
            keys: std::mem::take(&mut self.keys),
            unescaped_keys: std::mem::take(&mut self.unescaped_keys),
            pending_key: (0, 0, 0),
        };
        // Sized once for the value (as `scan` sizes its arena), not grown step by step.
        scanner.nodes.reserve((src.len() / 8 + 8).min(1 << 16));
        scanner.keys.reserve((src.len() / 16 + 4).min(1 << 16));
        scanner.frames.reserve(8);
        let ran = scanner.run();
        self.nodes = scanner.nodes;
        self.frames = scanner.frames;
        self.keys = scanner.keys;
        self.unescaped_keys = scanner.unescaped_keys;
        self.nodes.clear();
        self.frames.clear();
        self.keys.clear();
        if !self.unescaped_keys.is_empty() {
            zeroize::Zeroize::zeroize(&mut self.unescaped_keys);
        }
        ran?;
        std::str::from_utf8(src).map_err(|e| syntax_at(src, e.valid_up_to()))?;
        Ok(())
    }
}

impl Drop for Validator {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.unescaped_keys);
    }
}

/// Each new key of an object with up to this many members is compared with the earlier ones
/// (by fingerprint first, so mostly one `u64` comparison each): cheapest for typical bodies.
/// Larger objects are checked once, when they close, by sorting their keys, which keeps the
/// check O(n log n) without hashing (so no hash-flooding surface and no per-key hashing cost).
const SMALL_OBJECT_MEMBERS: usize = 32;

/// Keys that serde_json intercepts as the first key of an object (see [`scan`]).
const SERDE_PRIVATE_KEYS: [&[u8]; 2] = [
    b"$serde_json::private::Number",
    b"$serde_json::private::RawValue",
];

/// An open object or array.
struct Frame {
    node: u32,
    is_object: bool,
    /// Where this object's keys start in `Scanner::keys`.
    keys_base: usize,
    /// Where this object's unescaped keys start in `Scanner::unescaped_keys`.
    unescaped_base: usize,
    members: usize,
}

/// A key of an open object, for the duplicate check.
#[derive(Clone, Copy)]
struct KeyEntry {
    /// Cheap fingerprint of the unescaped key, to skip most byte comparisons.
    fp: u64,
    /// The unescaped key: a range of the source, or of `Scanner::unescaped_keys` if the key
    /// has escapes.
    start: u32,
    end: u32,
    unescaped: bool,
    /// Offset of the key's opening quote, for the error position.
    quote: u32,
}

impl KeyEntry {
    fn bytes<'k>(&self, src: &'k [u8], unescaped: &'k [u8]) -> &'k [u8] {
        let from = if self.unescaped { unescaped } else { src };
        from.get(self.start as usize..self.end as usize)
            .unwrap_or_default()
    }
}

struct Scanner<'a> {
    src: &'a [u8],
    pos: usize,
    max_depth: usize,
    nodes: Vec<Node>,
    /// Open containers, innermost last: an explicit stack instead of recursion.
    frames: Vec<Frame>,
    /// Keys of the open objects, innermost object's last (a stack, like `frames`).
    keys: Vec<KeyEntry>,
    /// Unescaped forms of the open objects' keys that have escapes (rare).
    unescaped_keys: Vec<u8>,
    /// Key (start, end, flags) for the next node pushed, set by `parse_key`.
    pending_key: (u32, u32, u8),
}

impl<'a> Scanner<'a> {
    fn err(&self, at: usize) -> JsonError {
        syntax_at(self.src, at)
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn push_node(&mut self, kind: Kind, start: usize, end: usize, flags: u8) -> u32 {
        let idx = self.nodes.len() as u32;
        let (key_start, key_end, key_flags) = std::mem::take(&mut self.pending_key);
        self.nodes.push(Node {
            start: start as u32,
            end: end as u32,
            key_start,
            key_end,
            next: idx + 1,
            kind,
            flags: flags | key_flags,
        });
        idx
    }

    fn run(&mut self) -> Result<(), JsonError> {
        self.skip_ws();
        'value: loop {
            // A value starts at `self.pos` (whitespace already skipped).
            let start = self.pos;
            match self.peek() {
                Some(open @ (b'{' | b'[')) => {
                    if self.frames.len() >= self.max_depth {
                        return Err(JsonError::TooDeep(self.max_depth));
                    }
                    let is_object = open == b'{';
                    let kind = if is_object { Kind::Object } else { Kind::Array };
                    let node = self.push_node(kind, start, start, 0);
                    self.frames.push(Frame {
                        node,
                        is_object,
                        keys_base: self.keys.len(),
                        unescaped_base: self.unescaped_keys.len(),
                        members: 0,
                    });
                    self.pos += 1;
                    self.skip_ws();
                    let close = if is_object { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.close_frame()?;
                    } else {
                        if is_object {
                            self.parse_key()?;
                        }
                        continue 'value;
                    }
                }
                Some(b'"') => {
                    let escaped = self.scan_string()?;
                    let flags = if escaped { STR_ESCAPED } else { 0 };
                    self.push_node(Kind::String, start, self.pos, flags);
                }
                Some(b'-' | b'0'..=b'9') => {
                    self.scan_number()?;
                    self.push_node(Kind::Number, start, self.pos, 0);
                }
                Some(b't') => self.literal(b"true", Kind::Bool)?,
                Some(b'f') => self.literal(b"false", Kind::Bool)?,
                Some(b'n') => self.literal(b"null", Kind::Null)?,
                _ => return Err(self.err(start)),
            }
            // A value just ended: close containers until one continues with a comma.
            loop {
                let Some(frame) = self.frames.last() else {
                    self.skip_ws();
                    return match self.peek() {
                        None => Ok(()),
                        Some(_) => Err(self.err(self.pos)),
                    };
                };
                let is_object = frame.is_object;
                self.skip_ws();
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        self.skip_ws();
                        if is_object {
                            self.parse_key()?;
                        }
                        continue 'value;
                    }
                    Some(b'}') if is_object => self.close_frame()?,
                    Some(b']') if !is_object => self.close_frame()?,
                    _ => return Err(self.err(self.pos)),
                }
            }
        }
    }

    /// Closes the innermost container; `self.pos` is at its closing bracket.
    fn close_frame(&mut self) -> Result<(), JsonError> {
        self.pos += 1;
        let Some(frame) = self.frames.pop() else {
            return Ok(());
        };
        let next = self.nodes.len() as u32;
        if let Some(node) = self.nodes.get_mut(frame.node as usize) {
            node.end = self.pos as u32;
            node.next = next;
        }
        if frame.is_object {
            if frame.members > SMALL_OBJECT_MEMBERS {
                self.check_large_object(frame.keys_base)?;
            }
            self.keys.truncate(frame.keys_base);
            self.unescaped_keys.truncate(frame.unescaped_base);
        }
        Ok(())
    }

    /// Duplicate check for an object too large for the per-key linear check: sort its keys
    /// (by fingerprint, then bytes) so that equal keys end up adjacent.
    fn check_large_object(&mut self, keys_base: usize) -> Result<(), JsonError> {
        let (src, unescaped) = (self.src, &self.unescaped_keys);
        let Some(entries) = self.keys.get_mut(keys_base..) else {
            return Ok(());
        };
        entries.sort_unstable_by(|a, b| {
            a.fp.cmp(&b.fp)
                .then_with(|| a.bytes(src, unescaped).cmp(b.bytes(src, unescaped)))
        });
        let duplicate = entries.windows(2).find_map(|pair| match pair {
            [a, b] if a.fp == b.fp && a.bytes(src, unescaped) == b.bytes(src, unescaped) => {
                Some(a.quote.max(b.quote))
            }
            _ => None,
        });
        match duplicate {
            Some(quote) => {
                let (line, column) = line_col(src, quote as usize);
                Err(JsonError::DuplicateKey { line, column })
            }
            None => Ok(()),
        }
    }

    fn literal(&mut self, word: &'static [u8], kind: Kind) -> Result<(), JsonError> {
        let start = self.pos;
        match self.src.get(start..start + word.len()) {
            Some(s) if s == word => {
                self.pos += word.len();
                self.push_node(kind, start, self.pos, 0);
                Ok(())
            }
            _ => {
                // Point at the first byte that differs.
                let rest = self.src.get(start..).unwrap_or_default();
                let same = rest.iter().zip(word).take_while(|(a, b)| a == b).count();
                Err(self.err(start + same))
            }
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`; any magnitude is accepted, as with
    /// serde_json's `arbitrary_precision`.
    fn scan_number(&mut self) -> Result<(), JsonError> {
        let src = self.src;
        let digit = |i: usize| src.get(i).is_some_and(u8::is_ascii_digit);
        let mut i = self.pos;
        if src.get(i) == Some(&b'-') {
            i += 1;
        }
        match src.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                i += 1;
                while digit(i) {
                    i += 1;
                }
            }
            _ => return Err(self.err(i)),
        }
        if src.get(i) == Some(&b'.') {
            i += 1;
            if !digit(i) {
                return Err(self.err(i));
            }
            while digit(i) {
                i += 1;
            }
        }
        if let Some(b'e' | b'E') = src.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = src.get(i) {
                i += 1;
            }
            if !digit(i) {
                return Err(self.err(i));
            }
            while digit(i) {
                i += 1;
            }
        }
        self.pos = i;
        Ok(())
    }

    /// Scans a string starting at the opening quote at `self.pos`; leaves `self.pos` just past
    /// the closing quote. Returns whether the string contains escapes.
    ///
    /// UTF-8 is not checked here (see `scan_with_limit`); bytes >= 0x80 pass through.
    fn scan_string(&mut self) -> Result<bool, JsonError> {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        /// High bit set in every byte of `v` that is zero. The lowest flagged byte is exact;
        /// only bytes above a real zero may be flagged spuriously, which is fine since only
        /// the lowest is used.
        fn zero_bytes(v: u64) -> u64 {
            v.wrapping_sub(ONES) & !v & HIGH
        }
        let src = self.src;
        let mut i = self.pos + 1;
        let mut escaped = false;
        loop {
            // Eight bytes at a time until a quote, backslash or control character shows up.
            while let Some(chunk) = src.get(i..).and_then(<[u8]>::first_chunk::<8>) {
                let w = u64::from_le_bytes(*chunk);
                let special = zero_bytes(w ^ (ONES * u64::from(b'"')))
                    | zero_bytes(w ^ (ONES * u64::from(b'\\')))
                    | (w.wrapping_sub(ONES * 0x20) & !w & HIGH);
                if special != 0 {
                    i += (special.trailing_zeros() / 8) as usize;
                    break;
                }
                i += 8;
            }
            match src.get(i) {
                None => return Err(self.err(i)),
                Some(b'"') => {
                    self.pos = i + 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    escaped = true;
                    i = self.escape(i)?;
                }
                Some(&b) if b < 0x20 => return Err(self.err(i)),
                Some(_) => i += 1,
            }
        }
    }

    /// Validates the escape whose backslash is at `i`; returns the index just past it.
    /// `\u` escapes must not be lone surrogates (serde_json refuses them in a `String`).
    fn escape(&self, i: usize) -> Result<usize, JsonError> {
        match self.src.get(i + 1) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(i + 2),
            Some(b'u') => {
                let hi = self.hex4(i + 2)?;
                match hi {
                    0xDC00..=0xDFFF => Err(self.err(i + 6)),
                    0xD800..=0xDBFF => {
                        if self.src.get(i + 6) != Some(&b'\\') {
                            return Err(self.err(i + 6));
                        }
                        if self.src.get(i + 7) != Some(&b'u') {
                            return Err(self.err(i + 7));
                        }
                        match self.hex4(i + 8)? {
                            0xDC00..=0xDFFF => Ok(i + 12),
                            _ => Err(self.err(i + 12)),
                        }
                    }
                    _ => Ok(i + 6),
                }
            }
            _ => Err(self.err(i + 1)),
        }
    }

    fn hex4(&self, at: usize) -> Result<u32, JsonError> {
        let mut n = 0;
        for k in at..at + 4 {
            let d = self
                .src
                .get(k)
                .and_then(|&b| (b as char).to_digit(16))
                .ok_or_else(|| self.err(k))?;
            n = n * 16 + d;
        }
        Ok(n)
    }

    /// Parses `"key" :` at `self.pos` (whitespace before it already skipped), checks it
    /// against the innermost object's other keys, and leaves `self.pos` at the value.
    fn parse_key(&mut self) -> Result<(), JsonError> {
        let quote = self.pos;
        if self.peek() != Some(b'"') {
            return Err(self.err(quote));
        }
        let escaped = self.scan_string()?;
        let (start, end) = (quote + 1, self.pos - 1);
        self.check_key(quote, start, end, escaped)?;
        self.pending_key = (
            start as u32,
            end as u32,
            if escaped { KEY_ESCAPED } else { 0 },
        );
        self.skip_ws();
        if self.peek() != Some(b':') {
            return Err(self.err(self.pos));
        }
        self.pos += 1;
        self.skip_ws();
        Ok(())
    }

    /// Records a new key of the innermost object, checking it against the object's earlier
    /// keys (small objects; large ones are checked when they close) and against serde_json's
    /// marker keys.
    fn check_key(
        &mut self,
        quote: usize,
        start: usize,
        end: usize,
        escaped: bool,
    ) -> Result<(), JsonError> {
        let src = self.src;
        let Some(frame) = self.frames.last_mut() else {
            return Ok(());
        };
        let mut entry = KeyEntry {
            fp: 0,
            start: start as u32,
            end: end as u32,
            unescaped: escaped,
            quote: quote as u32,
        };
        if escaped {
            // Never longer than the raw key, so the offsets fit in u32 as the source's do.
            let at = self.unescaped_keys.len();
            unescape_into(
                src.get(start..end).unwrap_or_default(),
                &mut self.unescaped_keys,
            );
            entry.start = at as u32;
            entry.end = self.unescaped_keys.len() as u32;
        }
        let unescaped = &self.unescaped_keys;
        let key = entry.bytes(src, unescaped);
        frame.members += 1;
        if frame.members == 1 && SERDE_PRIVATE_KEYS.contains(&key) {
            return Err(syntax_at(src, quote));
        }
        entry.fp = fingerprint(key);
        if frame.members <= SMALL_OBJECT_MEMBERS {
            let earlier = self.keys.get(frame.keys_base..).unwrap_or_default();
            if earlier
                .iter()
                .any(|e| e.fp == entry.fp && e.bytes(src, unescaped) == key)
            {
                let (line, column) = line_col(src, quote);
                return Err(JsonError::DuplicateKey { line, column });
            }
        }
        self.keys.push(entry);
        Ok(())
    }
}

/// Cheap, non-cryptographic fingerprint of a key: length, first and last eight bytes. Only a
/// filter in front of exact comparisons, so crafted collisions cost at most
/// [`SMALL_OBJECT_MEMBERS`] short `memcmp`s per key (and nothing asymptotic when sorting).
fn fingerprint(key: &[u8]) -> u64 {
    let (head, tail) = match (key.first_chunk::<8>(), key.last_chunk::<8>()) {
        (Some(head), Some(tail)) => (u64::from_le_bytes(*head), u64::from_le_bytes(*tail)),
        // Shorter than 8 bytes: the bytes themselves (plus the length) are the fingerprint.
        _ => (key.iter().fold(0, |acc, &b| (acc << 8) | u64::from(b)), 0),
    };
    head ^ tail.rotate_left(29) ^ (key.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn syntax_at(src: &[u8], offset: usize) -> JsonError {
    let (line, column) = line_col(src, offset);
    JsonError::Syntax { line, column }
}

/// 1-based line and column (in bytes) of `offset`. Only computed on the error path.
fn line_col(src: &[u8], offset: usize) -> (usize, usize) {
    let before = src.get(..offset).unwrap_or(src);
    let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    (line, before.len() - line_start + 1)
}

/// Appends the unescaped form of a string's raw contents to `out`. The input has been
/// validated by the scanner; should it not be, malformed escapes become U+FFFD rather than a
/// panic.
fn unescape_into(raw: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while let Some(rel) = raw
        .get(i..)
        .and_then(|r| r.iter().position(|&b| b == b'\\'))
    {
        out.extend_from_slice(raw.get(i..i + rel).unwrap_or_default());
        i += rel;
        let simple = match raw.get(i + 1) {
            Some(b'"') => Some(b'"'),
            Some(b'\\') => Some(b'\\'),
            Some(b'/') => Some(b'/'),
            Some(b'b') => Some(0x08),
            Some(b'f') => Some(0x0C),
            Some(b'n') => Some(b'\n'),
            Some(b'r') => Some(b'\r'),
            Some(b't') => Some(b'\t'),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            i += 2;
            continue;
        }
        let hex = |at: usize| -> Option<u32> {
            let digits = std::str::from_utf8(raw.get(at..at + 4)?).ok()?;
            u32::from_str_radix(digits, 16).ok()
        };
        let (c, len) = match hex(i + 2) {
            Some(hi @ 0xD800..=0xDBFF) => match (raw.get(i + 6..i + 8), hex(i + 8)) {
                (Some(b"\\u"), Some(lo @ 0xDC00..=0xDFFF)) => (
                    char::from_u32(0x1_0000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)),
                    12,
                ),
                _ => (None, 6),
            },
            Some(n) => (char::from_u32(n), 6),
            None => (None, 2),
        };
        let c = c.unwrap_or(char::REPLACEMENT_CHARACTER);
        out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
        i += len;
    }
    out.extend_from_slice(raw.get(i..).unwrap_or_default());
}

fn unescape_str(raw: &str) -> Cow<'_, str> {
    if !raw.contains('\\') {
        return Cow::Borrowed(raw);
    }
    let mut out = Vec::with_capacity(raw.len());
    unescape_into(raw.as_bytes(), &mut out);
    Cow::Owned(
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    )
}

// ---------------------------------------------------------------------------------------------
// JSONPath
// ---------------------------------------------------------------------------------------------

/// A JSONPath from the subset the fast path supports: name, index and wildcard selectors in
/// child and descendant segments (no slices, no filters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPath {
    segments: Vec<CSegment>,
    /// Every segment is a child segment with one name or index selector, so at most one node
    /// matches and `locate` can walk straight down without any bookkeeping.
    singular: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CSegment {
    descendant: bool,
    /// Never empty.
    selectors: Vec<CSelector>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum CSelector {
    Name(String),
    Index(i64),
    Wildcard,
}

impl CompiledPath {
    /// The member names the path selects by name (`$.card.number`: `card`, `number`).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().flat_map(|s| {
            s.selectors.iter().filter_map(|sel| match sel {
                CSelector::Name(n) => Some(n.as_str()),
                _ => None,
            })
        })
    }

    /// The member names in the path's last segment that selects by name (`$.card.number`:
    /// `number`; `$.notes[*].text`: `text`; `$.tags[0]`: `tags`); empty when no segment does
    /// (`$.*`). What a query parameter would call the encrypted values.
    pub fn last_names(&self) -> Vec<&str> {
        self.segments
            .iter()
            .rev()
            .map(|s| {
                s.selectors
                    .iter()
                    .filter_map(|sel| match sel {
                        CSelector::Name(n) => Some(n.as_str()),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            })
            .find(|names| !names.is_empty())
            .unwrap_or_default()
    }

    /// Compiles a parsed path; slices, filters, and shapes the parser never produces (empty
    /// unions, nested descendant segments) are refused.
    pub fn compile(q: &JpQuery) -> Result<CompiledPath, String> {
        fn selector(s: &Selector) -> Result<CSelector, String> {
            match s {
                Selector::Name(n) => Ok(CSelector::Name(n.clone())),
                Selector::Index(i) => Ok(CSelector::Index(*i)),
                Selector::Wildcard => Ok(CSelector::Wildcard),
                Selector::Slice(..) => Err("slice selectors are not supported".into()),
                Selector::Filter(_) => Err("filter selectors are not supported".into()),
            }
        }
        fn selectors(seg: &Segment) -> Result<Vec<CSelector>, String> {
            match seg {
                Segment::Selector(s) => Ok(vec![selector(s)?]),
                Segment::Selectors(v) if v.is_empty() => Err("empty selector list".into()),
                Segment::Selectors(v) => v.iter().map(selector).collect(),
                Segment::Descendant(_) => Err("nested descendant segment".into()),
            }
        }
        let segments = q
            .segments
            .iter()
            .map(|seg| match seg {
                Segment::Descendant(inner) => Ok(CSegment {
                    descendant: true,
                    selectors: selectors(inner)?,
                }),
                other => Ok(CSegment {
                    descendant: false,
                    selectors: selectors(other)?,
                }),
            })
            .collect::<Result<Vec<_>, String>>()?;
        let singular = segments.iter().all(|s| {
            !s.descendant
                && matches!(
                    s.selectors.as_slice(),
                    [CSelector::Name(_) | CSelector::Index(_)]
                )
        });
        Ok(CompiledPath { segments, singular })
    }

    /// Whether the path contains a descendant (`..`) segment.
    pub fn has_descendant(&self) -> bool {
        self.segments.iter().any(|s| s.descendant)
    }

    /// The nodes this path selects, evaluated with `from` as the root (`$`).
    ///
    /// Same nodes, in the same order, as the proxy's reference pipeline: `jsonpath_rust`'s
    /// `js_path_process` on a `serde_json::Value` (RFC 9535 selection, union results grouped
    /// selector by selector), then stably sorted by depth, keeping only the first occurrence
    /// of each location that is not inside (or equal to) one kept before. So the result is
    /// shallowest first, free of duplicates, and no result contains another: the spans can be
    /// spliced independently.
    /// [`CompiledPath::locate`], handing each match to `f`: no allocation for a singular path
    /// (the common `$.a.b`).
    pub fn for_each_match(&self, doc: &Scanned<'_>, from: NodeId, mut f: impl FnMut(NodeId)) {
        if self.singular {
            if let Some(n) = self.locate_singular(doc, from) {
                f(n);
            }
        } else {
            self.locate(doc, from).into_iter().for_each(f);
        }
    }

    pub fn locate(&self, doc: &Scanned<'_>, from: NodeId) -> Vec<NodeId> {
        if self.singular {
            return self.locate_singular(doc, from).into_iter().collect();
        }
        // (node, depth below `from`)
        let mut cur: Vec<(NodeId, u32)> = vec![(from, 0)];
        let mut next = Vec::new();
        let mut expanded = Vec::new();
        let mut ends = Vec::new();
        for seg in &self.segments {
            let input = if seg.descendant {
                expanded.clear();
                for &(n, d) in &cur {
                    push_containers(doc, n, d, &mut expanded, &mut ends);
                }
                &expanded
            } else {
                &cur
            };
            next.clear();
            // Selector-major, like jsonpath_rust's union: all matches of the first selector,
            // then all of the second, ...
            for sel in &seg.selectors {
                for &(n, d) in input {
                    select(doc, sel, n, d + 1, &mut next);
                }
            }
            std::mem::swap(&mut cur, &mut next);
        }
        outermost_first(doc, cur)
    }

    fn locate_singular(&self, doc: &Scanned<'_>, from: NodeId) -> Option<NodeId> {
        let mut cur = from;
        for seg in &self.segments {
            cur = match seg.selectors.first()? {
                CSelector::Name(name) => doc.member(cur, name)?,
                CSelector::Index(i) => array_index(doc, cur, *i)?,
                CSelector::Wildcard => return None,
            };
        }
        Some(cur)
    }
}

/// Applies one selector to node `n`, pushing the selected children (at depth `d`).
fn select(doc: &Scanned<'_>, sel: &CSelector, n: NodeId, d: u32, out: &mut Vec<(NodeId, u32)>) {
    match sel {
        CSelector::Name(name) => {
            if let Some(c) = doc.member(n, name) {
                out.push((c, d));
            }
        }
        CSelector::Index(i) => {
            if let Some(c) = array_index(doc, n, *i) {
                out.push((c, d));
            }
        }
        CSelector::Wildcard => out.extend(doc.child_ids(n).map(|c| (c, d))),
    }
}

/// RFC 9535 index selection: negative counts from the end, out of range selects nothing.
fn array_index(doc: &Scanned<'_>, n: NodeId, i: i64) -> Option<NodeId> {
    if doc.kind(n) != Kind::Array {
        return None;
    }
    if i >= 0 {
        doc.index(n, usize::try_from(i).ok()?)
    } else {
        let len = doc.child_ids(n).count();
        let back = usize::try_from(i.unsigned_abs()).ok()?;
        doc.index(n, len.checked_sub(back)?)
    }
}

/// Pushes `n` and every container below it, in document order, with their depths: the nodes
/// a descendant segment applies its selectors to. Scalars are skipped, as in
/// `jsonpath_rust` (no selector selects anything from a scalar anyway). Iterative: the arena
/// is already in pre-order, and `ends` (reused scratch) tracks the open ancestors for depth.
fn push_containers(
    doc: &Scanned<'_>,
    n: NodeId,
    d: u32,
    out: &mut Vec<(NodeId, u32)>,
    ends: &mut Vec<u32>,
) {
    let Some(root) = doc.nodes.get(n.index()) else {
        return;
    };
    if !root.kind.is_container() {
        return;
    }
    ends.clear();
    for (i, node) in doc
        .nodes
        .iter()
        .enumerate()
        .take(root.next as usize)
        .skip(n.index())
    {
        let i = i as u32;
        while ends.last().is_some_and(|&e| e <= i) {
            ends.pop();
        }
        if node.kind.is_container() {
            out.push((NodeId(i), d + ends.len() as u32));
            ends.push(node.next);
        }
    }
}

/// The proxy's post-processing of matches: stable sort by depth, then keep each location
/// only if no location kept before it is a prefix of it (or equal to it).
///
/// Done in O(n log n) instead of the reference's pairwise prefix test: a node is kept iff no
/// strict ancestor matched (found by one pass over the matches in pre-order, where the
/// nearest kept node is the only candidate ancestor) and it is that node's first occurrence.
fn outermost_first(doc: &Scanned<'_>, matches: Vec<(NodeId, u32)>) -> Vec<NodeId> {
    if matches.len() <= 1 {
        return matches.into_iter().map(|(n, _)| n).collect();
    }
    let mut ids: Vec<NodeId> = matches.iter().map(|&(n, _)| n).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut outermost: Vec<NodeId> = Vec::with_capacity(ids.len());
    for id in ids {
        if outermost.last().is_none_or(|&kept| !doc.contains(kept, id)) {
            outermost.push(id);
        }
    }
    let mut emitted = vec![false; outermost.len()];
    let mut out: Vec<(NodeId, u32)> = Vec::with_capacity(outermost.len());
    for (n, d) in matches {
        if let Ok(k) = outermost.binary_search(&n)
            && let Some(seen @ false) = emitted.get_mut(k)
        {
            *seen = true;
            out.push((n, d));
        }
    }
    out.sort_by_key(|&(_, d)| d); // stable, like the reference
    out.into_iter().map(|(n, _)| n).collect()
}

/// Conservatively, whether some document could have a match of `a` inside (or equal to) a
/// match of `b`, or the other way round. The fast path splices each match independently, so
/// it is only correct when no two configured paths may overlap.
///
/// Both paths are read as patterns over the steps of a location (a child segment consumes one
/// step its selectors accept; a descendant segment first any number of steps); the answer is
/// whether some step sequence lets one pattern finish while the other is still consistent
/// with it, searched over pairs of pattern positions. Steps are compatible selector by
/// selector: equal names, equal indexes, a negative index with any index (its position
/// depends on the array length), a wildcard with anything; a name never with an index. This
/// is exact for child-only paths except for negative indexes, and exact up to the same caveat
/// for descendant segments.
pub fn may_overlap(a: &CompiledPath, b: &CompiledPath) -> bool {
    let (na, nb) = (a.segments.len(), b.segments.len());
    let width = nb + 1;
    let mut seen = vec![false; (na + 1) * width];
    let mut todo = vec![(0usize, 0usize)];
    while let Some((i, j)) = todo.pop() {
        if i == na || j == nb {
            // One path has matched a location the other can still extend (or has matched
            // too): every segment can always consume some step.
            return true;
        }
        let Some(flag) = seen.get_mut(i * width + j) else {
            continue;
        };
        if *flag {
            continue;
        }
        *flag = true;
        let (sa, sb) = (&a.segments[i], &b.segments[j]);
        if selectors_compatible(&sa.selectors, &sb.selectors) {
            todo.push((i + 1, j + 1));
        }
        if sb.descendant {
            todo.push((i + 1, j)); // b skips the step a's selector consumes
        }
        if sa.descendant {
            todo.push((i, j + 1));
        }
    }
    false
}

fn selectors_compatible(a: &[CSelector], b: &[CSelector]) -> bool {
    use CSelector::{Index, Name, Wildcard};
    a.iter().any(|x| {
        b.iter().any(|y| match (x, y) {
            (Wildcard, _) | (_, Wildcard) => true,
            (Name(p), Name(q)) => p == q,
            (Index(p), Index(q)) => p == q || *p < 0 || *q < 0,
            (Name(_), Index(_)) | (Index(_), Name(_)) => false,
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Splicing
// ---------------------------------------------------------------------------------------------

/// Copies `src` with each edit's range replaced by its bytes, in one exactly-sized allocation.
///
/// The edits are sorted in place by range; they must lie within `src` and must not overlap
/// (empty ranges are insertions; several at one position keep their given order and come
/// before a replacement starting there).
pub fn splice<B: AsRef<[u8]>>(
    src: &[u8],
    edits: &mut [(Range<usize>, B)],
) -> Result<Vec<u8>, SpliceError> {
    edits.sort_by_key(|(r, _)| (r.start, r.end));
    let mut size = src.len();
    let mut prev_end = 0;
    for (r, bytes) in edits.iter() {
        if r.start > r.end || r.end > src.len() {
            return Err(SpliceError::OutOfBounds {
                start: r.start,
                end: r.end,
                len: src.len(),
            });
        }
        if r.start < prev_end {
            return Err(SpliceError::Overlap(r.start));
        }
        prev_end = r.end;
        // Cannot underflow: the ranges are disjoint and within `src`.
        size = size - (r.end - r.start) + bytes.as_ref().len();
    }
    let mut out = Vec::with_capacity(size);
    let mut at = 0;
    for (r, bytes) in edits.iter() {
        out.extend_from_slice(src.get(at..r.start).unwrap_or_default());
        out.extend_from_slice(bytes.as_ref());
        at = r.end;
    }
    out.extend_from_slice(src.get(at..).unwrap_or_default());
    debug_assert_eq!(out.len(), size);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use jsonpath_rust::parser::parse_json_path;
    use proptest::prelude::*;
    use serde_json::Value;

    /// Reference: serde_json with the proxy's two extra rules (duplicate keys, depth), written
    /// the way the proxy's DOM path enforces them, so accept/reject can be compared exactly.
    mod oracle {
        use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
        use std::collections::HashSet;
        use std::fmt;

        #[derive(Clone, Copy)]
        struct Seed {
            depth: usize,
            max: usize,
        }

        impl Seed {
            fn enter<E: de::Error>(self) -> Result<Seed, E> {
                if self.depth >= self.max {
                    return Err(E::custom("too deep"));
                }
                Ok(Seed {
                    depth: self.depth + 1,
                    max: self.max,
                })
            }
        }

        impl<'de> DeserializeSeed<'de> for Seed {
            type Value = ();
            fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                d.deserialize_any(self)
            }
        }

        impl<'de> Visitor<'de> for Seed {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<(), E> {
                Ok(())
            }
            fn visit_i64<E>(self, _: i64) -> Result<(), E> {
                Ok(())
            }
            fn visit_u64<E>(self, _: u64) -> Result<(), E> {
                Ok(())
            }
            fn visit_f64<E>(self, _: f64) -> Result<(), E> {
                Ok(())
            }
            fn visit_str<E>(self, _: &str) -> Result<(), E> {
                Ok(())
            }
            fn visit_unit<E>(self) -> Result<(), E> {
                Ok(())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
                let inner = self.enter()?;
                while seq.next_element_seed(inner)?.is_some() {}
                Ok(())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
                let Some(first) = map.next_key::<String>()? else {
                    self.enter::<A::Error>()?;
                    return Ok(());
                };
                // arbitrary_precision hands numbers over as this one-entry map.
                if first == "$serde_json::private::Number" {
                    let _: String = map.next_value()?;
                    return Ok(());
                }
                let inner = self.enter()?;
                let mut seen = HashSet::new();
                seen.insert(first);
                map.next_value_seed(inner)?;
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key) {
                        return Err(de::Error::custom("duplicate key"));
                    }
                    map.next_value_seed(inner)?;
                }
                Ok(())
            }
        }

        pub fn accepts(bytes: &[u8], max_depth: usize) -> bool {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            Seed {
                depth: 0,
                max: max_depth,
            }
            .deserialize(&mut de)
            .and_then(|()| de.end())
            .is_ok()
        }
    }

    fn serde_accepts(input: &[u8]) -> bool {
        serde_json::from_slice::<Value>(input).is_ok()
    }

    /// Rebuilds a `Value` from the span index alone (keys and strings unescaped by us, numbers
    /// from their raw text), to compare with serde_json's reading of the same input.
    fn to_value(doc: &Scanned<'_>, n: NodeId) -> Value {
        match doc.kind(n) {
            Kind::Object => Value::Object(
                doc.children(n)
                    .map(|(k, c)| match k {
                        ChildKey::Key(k) => (k.into_owned(), to_value(doc, c)),
                        ChildKey::Index(_) => panic!("index key in an object"),
                    })
                    .collect(),
            ),
            Kind::Array => Value::Array(doc.child_ids(n).map(|c| to_value(doc, c)).collect()),
            Kind::String => Value::String(doc.string_value(n).unwrap().into_owned()),
            Kind::Number | Kind::Bool | Kind::Null => serde_json::from_slice(doc.raw(n)).unwrap(),
        }
    }

    fn same_as_serde(input: &[u8]) {
        let doc = scan(input, 64).unwrap();
        let ours = serde_json::to_string(&to_value(&doc, doc.root())).unwrap();
        let theirs =
            serde_json::to_string(&serde_json::from_slice::<Value>(input).unwrap()).unwrap();
        assert_eq!(ours, theirs, "input {:?}", String::from_utf8_lossy(input));
    }

    fn path(p: &str) -> CompiledPath {
        CompiledPath::compile(&parse_json_path(p).unwrap()).unwrap()
    }

    fn locations(doc: &Scanned<'_>, p: &str) -> Vec<Vec<Step>> {
        path(p)
            .locate(doc, doc.root())
            .into_iter()
            .map(|n| doc.location(n))
            .collect()
    }

    fn k(s: &str) -> Step {
        Step::Key(s.to_string())
    }

    fn i(n: usize) -> Step {
        Step::Index(n)
    }

    // ---- scanner: structure and accessors ------------------------------------------------

    #[test]
    fn index_has_kinds_spans_keys_and_subtrees() {
        let src =
            br#" {"s":"x\"y","n":-1.5e3,"t":true,"f":false,"z":null,"a":[1,{"b":[]}],"o":{}} "#;
        let doc = scan(src, 8).unwrap();
        let root = doc.root();
        assert_eq!(doc.kind(root), Kind::Object);
        assert_eq!(doc.span(root), 1..src.len() - 1);
        let keys: Vec<_> = doc
            .children(root)
            .map(|(k, c)| (k, doc.kind(c), doc.raw_str(c)))
            .collect();
        let key = |s: &'static str| ChildKey::Key(Cow::Borrowed(s));
        assert_eq!(
            keys,
            vec![
                (key("s"), Kind::String, r#""x\"y""#),
                (key("n"), Kind::Number, "-1.5e3"),
                (key("t"), Kind::Bool, "true"),
                (key("f"), Kind::Bool, "false"),
                (key("z"), Kind::Null, "null"),
                (key("a"), Kind::Array, r#"[1,{"b":[]}]"#),
                (key("o"), Kind::Object, "{}"),
            ]
        );
        let a = doc.member(root, "a").unwrap();
        let elems: Vec<_> = doc.children(a).map(|(k, c)| (k, doc.raw_str(c))).collect();
        assert_eq!(
            elems,
            vec![
                (ChildKey::Index(0), "1"),
                (ChildKey::Index(1), r#"{"b":[]}"#)
            ]
        );
        let inner = doc.index(a, 1).unwrap();
        let b = doc.member(inner, "b").unwrap();
        assert_eq!(doc.raw(b), b"[]");
        assert_eq!(doc.children(b).count(), 0);
        assert!(doc.contains(root, b) && doc.contains(a, b) && doc.contains(b, b));
        assert!(!doc.contains(b, a));
        assert!(!doc.contains(doc.member(root, "o").unwrap(), b));
        assert_eq!(doc.index(a, 2), None);
        assert_eq!(doc.index(root, 0), None, "index on an object");
        assert_eq!(doc.member(a, "0"), None, "name on an array");
        assert_eq!(doc.member(root, "missing"), None);
        assert_eq!(
            doc.string_value(doc.member(root, "s").unwrap()).unwrap(),
            "x\"y"
        );
        assert_eq!(doc.string_value(a), None);
        assert_eq!(doc.location(b), vec![k("a"), i(1), k("b")]);
        assert_eq!(doc.location(root), vec![]);
        assert_eq!(doc.key(b).unwrap(), "b");
        assert_eq!(doc.key(inner), None);
        assert_eq!(doc.len(), 11);
    }

    #[test]
    fn scalar_documents_and_whitespace() {
        for (src, kind, raw) in [
            (&b" \t\r\n 12 \n"[..], Kind::Number, "12"),
            (b"\"\"", Kind::String, "\"\""),
            (b"null", Kind::Null, "null"),
            (b"-0", Kind::Number, "-0"),
        ] {
            let doc = scan(src, 0).unwrap();
            assert_eq!(doc.kind(doc.root()), kind);
            assert_eq!(doc.raw_str(doc.root()), raw);
            assert_eq!(doc.children(doc.root()).count(), 0);
        }
    }

    #[test]
    fn keys_and_strings_are_unescaped_on_demand() {
        let src = br#"{"a\u0062":"\ud83d\ude00 \u00e9\n\/","plain":"p","\"q\"":1}"#;
        let doc = scan(src, 4).unwrap();
        let root = doc.root();
        let ab = doc
            .member(root, "ab")
            .expect("escaped key found by its unescaped name");
        assert_eq!(doc.string_value(ab).unwrap(), "\u{1F600} \u{e9}\n/");
        assert!(matches!(
            doc.string_value(doc.member(root, "plain").unwrap()),
            Some(Cow::Borrowed("p"))
        ));
        assert!(doc.member(root, "\"q\"").is_some());
        assert_eq!(
            doc.member(root, "a\\u0062"),
            None,
            "raw spelling is not the name"
        );
        assert_eq!(doc.location(ab), vec![k("ab")]);
        same_as_serde(src);
    }

    // ---- scanner: grammar agreement with serde_json ----------------------------------------

    const VALID: &[&str] = &[
        "0",
        "-0",
        "1e5",
        "1E+5",
        "1e-5",
        "0.0",
        "-12.340e010",
        "123456789012345678901234567890",
        "1e999999",
        "[]",
        "{}",
        "[[],{}]",
        r#"{"":""}"#,
        r#""\u0000\u001f\uFFFF\uDBFF\uDFFF""#,
        "\"\u{7f}\"",
        "\"é日本😀\"",
        r#""\"\\\/\b\f\n\r\t""#,
        " [ 1 , 2 ] ",
        "{\"a\" :\n1}",
        r#"{"a":1,"A":2}"#,
        r#"{"a":{"a":{"a":1}}}"#,
        r#"{"a":1,"b":{"a":2}}"#,
    ];

    const INVALID: &[&[u8]] = &[
        b"",
        b" ",
        b"[",
        b"]",
        b"{",
        b"[1,]",
        b"[,1]",
        b"{\"a\":1,}",
        b"{,}",
        b"{\"a\"}",
        b"{\"a\" 1}",
        b"{1:1}",
        b"{'a':1}",
        b"[1 2]",
        b"01",
        b"-",
        b"+1",
        b".5",
        b"1.",
        b"1.e5",
        b"1e",
        b"1e+",
        b"--1",
        b"0x10",
        b"NaN",
        b"Infinity",
        b"tru",
        b"nul",
        b"True",
        b"nulll",
        b"1 2",
        b"{} {}",
        b"[]]",
        b"\"abc",
        b"\"a\nb\"",
        b"\"\t\"",
        b"\"\x00\"",
        b"\"\\x\"",
        b"\"\\u12\"",
        b"\"\\u12G4\"",
        b"\"\\U0041\"",
        b"\"\\ud800\"",
        b"\"\\udc00\"",
        b"\"\\ud800\\u0041\"",
        b"\"\\ud800\\ud800\"",
        b"\"\\ud800x\"",
        b"\"\\ud800\\n\"",
        b"\"\\udc00\\ud800\"",
        b"\"\xff\"",
        b"\"\xc3\"",
        b"\"\xc3(\"",
        b"\"\xed\xa0\x80\"",
        b"\"\xc0\xaf\"",
        b"\"\xf4\x90\x80\x80\"",
        b"\xef\xbb\xbf{}",
        b"\x0c1",
        b"1\x00",
        b"[1]\x0b",
        b"/*x*/1",
        b"\"a\"\"b\"",
        b"[1]x",
        b"{\"a\":1}}",
        b"\"\\",
    ];

    #[test]
    fn accepts_what_serde_accepts() {
        let mut validator = Validator::default();
        for src in VALID {
            assert!(serde_accepts(src.as_bytes()), "serde rejects {src}");
            assert!(scan(src.as_bytes(), 8).is_ok(), "we reject {src}");
            assert!(validator.check(src.as_bytes(), 8).is_ok(), "{src}");
            same_as_serde(src.as_bytes());
        }
    }

    #[test]
    fn rejects_what_serde_rejects() {
        let mut validator = Validator::default();
        for src in INVALID {
            // Checked between valid values too: nothing is left over from one to the next.
            assert!(validator.check(b"{\"a\":[1,{\"b\\u0063\":2}]}", 8).is_ok());
            assert!(
                validator.check(src, 8).is_err(),
                "{:?}",
                String::from_utf8_lossy(src)
            );
            assert!(
                !serde_accepts(src),
                "serde accepts {:?}",
                String::from_utf8_lossy(src)
            );
            assert!(
                matches!(scan(src, 8), Err(JsonError::Syntax { .. })),
                "we do not reject {:?} as syntax: {:?}",
                String::from_utf8_lossy(src),
                scan(src, 8)
            );
        }
    }

    #[test]
    fn errors_carry_positions_not_content() {
        let src = b"{\n  \"ssn\": \"123-45-6789\",\n  \"x\": 1x\n}";
        let err = scan(src, 8).unwrap_err();
        assert_eq!(err, JsonError::Syntax { line: 3, column: 9 });
        assert_eq!(err.to_string(), "malformed JSON at line 3 column 9");
        let dup = scan(b"{\"ssn\":\"123-45-6789\",\n \"ssn\":\"6789\"}", 8).unwrap_err();
        assert_eq!(dup, JsonError::DuplicateKey { line: 2, column: 2 });
        assert!(!dup.to_string().contains("ssn") && !dup.to_string().contains("6789"));
        assert_eq!(
            scan(b"\"\xff\"", 8).unwrap_err(),
            JsonError::Syntax { line: 1, column: 2 }
        );
    }

    // ---- scanner: the extra rules --------------------------------------------------------

    #[test]
    fn depth_limit_counts_containers_and_allows_exactly_max() {
        assert!(scan(br#"{"a":1}"#, 1).is_ok());
        assert_eq!(scan(br#"{"a":[]}"#, 1).unwrap_err(), JsonError::TooDeep(1));
        assert_eq!(scan(b"[]", 0).unwrap_err(), JsonError::TooDeep(0));
        assert!(scan(b"1", 0).is_ok());
        let nested = |d: usize| format!("{}{}", "[".repeat(d), "]".repeat(d));
        assert!(scan(nested(20).as_bytes(), 20).is_ok());
        assert_eq!(
            scan(nested(21).as_bytes(), 20).unwrap_err(),
            JsonError::TooDeep(20)
        );
        // Sibling containers do not add up.
        assert!(scan(b"[[],[],{\"a\":1}]", 2).is_ok());
        assert_eq!(
            scan(b"[[],[],{\"a\":[]}]", 2).unwrap_err(),
            JsonError::TooDeep(2)
        );
    }

    #[test]
    fn deep_input_neither_recurses_nor_overflows() {
        let opens = vec![b'['; 1_000_000];
        assert!(matches!(
            scan(&opens, usize::MAX),
            Err(JsonError::Syntax { .. })
        ));
        assert_eq!(scan(&opens, 64).unwrap_err(), JsonError::TooDeep(64));
        let depth = 100_000;
        let src = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let doc = scan(src.as_bytes(), usize::MAX).unwrap();
        let all = path("$..*").locate(&doc, doc.root());
        assert_eq!(all.len(), 1, "only the outermost match survives");
        assert_eq!(doc.location(NodeId(depth as u32 - 1)).len(), depth - 1);
    }

    /// Pins serde_json's own recursion limit, which the integrator must keep in mind: the DOM
    /// path could never accept more than 127 levels, whatever `max_depth` said.
    #[test]
    fn serde_recursion_limit_is_127() {
        let nested = |d: usize| format!("{}{}", "[".repeat(d), "]".repeat(d));
        assert!(serde_accepts(nested(127).as_bytes()));
        assert!(!serde_accepts(nested(128).as_bytes()));
        assert!(scan(nested(128).as_bytes(), 128).is_ok());
    }

    #[test]
    fn duplicate_keys_are_refused_after_unescaping() {
        let dup =
            |src: &str| matches!(scan(src.as_bytes(), 8), Err(JsonError::DuplicateKey { .. }));
        assert!(dup(r#"{"a":1,"a":2}"#));
        assert!(dup(r#"{"a":1,"\u0061":2}"#));
        assert!(dup(r#"{"\u0061":1,"a":2}"#));
        assert!(dup(r#"{"\u0061":1,"\u0061":2}"#));
        assert!(dup(r#"{"a/":1,"a\/":2}"#));
        assert!(dup(r#"{"😀":1,"\ud83d\ude00":2}"#));
        assert!(dup(r#"{"x":{"a":1,"b":2,"a":3}}"#));
        assert!(!dup(r#"{"a":{"a":{"a":1}},"b":{"a":1}}"#));
        assert!(!dup(r#"{"a":1,"A":2,"a ":3,"\u0061b":4}"#));
        // Serde would keep the last value; the proxy must not silently pick one.
        assert!(serde_accepts(br#"{"a":1,"a":2}"#));
    }

    #[test]
    fn duplicate_keys_in_large_objects() {
        let object = |keys: &[String]| {
            let members: Vec<String> = keys.iter().map(|k| format!("\"{k}\":0")).collect();
            format!("{{{}}}", members.join(","))
        };
        let mut keys: Vec<String> = (0..40).map(|n| format!("key{n}")).collect();
        let ok = object(&keys);
        assert!(scan(ok.as_bytes(), 4).is_ok());
        // Sibling large objects with the same keys are fine.
        let twice = format!("[{ok},{ok},{{\"in\":{ok}}}]");
        assert!(scan(twice.as_bytes(), 4).is_ok());
        for (at, spelling) in [
            (39, "key3"),
            (39, "key\\u0033"),
            (17, "key16"),
            (30, r"\u006bey0"),
        ] {
            keys[at] = spelling.to_string();
            let bad = object(&keys);
            assert!(
                matches!(scan(bad.as_bytes(), 4), Err(JsonError::DuplicateKey { .. })),
                "{spelling} at {at}"
            );
            keys[at] = format!("key{at}");
        }
        // An escaped key stored before the switch to the hash set is compared unescaped.
        keys[0] = "\\u006bey0".to_string();
        keys[35] = "key0".to_string();
        assert!(matches!(
            scan(object(&keys).as_bytes(), 4),
            Err(JsonError::DuplicateKey { .. })
        ));
    }

    /// Keys with equal fingerprints (same length, same first and last eight bytes) must still
    /// be told apart exactly, in small and large objects, and must not make the check slow.
    #[test]
    fn fingerprint_collisions_are_still_exact() {
        let object = |n: usize, dup: Option<usize>| {
            let mut members: Vec<String> = (0..n)
                .map(|k| format!("\"prefix__{k:06}__suffix\":0"))
                .collect();
            if let Some(d) = dup {
                members.insert(n / 2, format!("\"prefix__{d:06}__suffix\":1"));
            }
            format!("{{{}}}", members.join(","))
        };
        assert!(scan(object(20, None).as_bytes(), 2).is_ok());
        assert!(scan(object(200, None).as_bytes(), 2).is_ok());
        for (n, d) in [(20, 3), (200, 0), (200, 199), (200, 150)] {
            assert!(
                matches!(
                    scan(object(n, Some(d)).as_bytes(), 2),
                    Err(JsonError::DuplicateKey { .. })
                ),
                "{n} {d}"
            );
        }
        let big = object(200_000, None);
        let started = std::time::Instant::now();
        assert!(scan(big.as_bytes(), 2).is_ok());
        // Generous for debug builds on a busy machine; a quadratic check takes minutes.
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(20), "{took:?}");
    }

    #[test]
    fn serde_private_marker_keys_are_refused() {
        for src in [
            r#"{"$serde_json::private::Number":"1"}"#,
            r#"{"\u0024serde_json::private::Number":"1"}"#,
            r#"{"$serde_json::private::Number":"x"}"#,
            r#"[{"$serde_json::private::RawValue":"1"}]"#,
        ] {
            assert!(
                matches!(scan(src.as_bytes(), 4), Err(JsonError::Syntax { .. })),
                "{src}"
            );
        }
        // What serde_json does with it: an object that is not an object.
        let v: Value = serde_json::from_str(r#"{"$serde_json::private::Number":"1"}"#).unwrap();
        assert!(v.is_number());
        // Not first: an ordinary key for serde_json, so for us too.
        assert!(scan(br#"{"a":1,"$serde_json::private::Number":"1"}"#, 4).is_ok());
    }

    #[test]
    fn oversized_input_is_refused_not_truncated() {
        assert!(scan_with_limit(b"[1,2]", 4, 5).is_ok());
        assert!(matches!(
            scan_with_limit(b"[1,2] ", 4, 5),
            Err(JsonError::Syntax { line: 1, column: 6 })
        ));
    }

    // ---- JSONPath --------------------------------------------------------------------------

    #[test]
    fn compile_refuses_slices_and_filters() {
        for p in ["$[1:2]", "$[?@.a]", "$..[::2]", "$['a',1:]"] {
            let q = parse_json_path(p).unwrap();
            assert!(CompiledPath::compile(&q).is_err(), "{p}");
        }
        assert!(CompiledPath::compile(&JpQuery::new(vec![Segment::Selectors(vec![])])).is_err());
        let nested =
            Segment::Descendant(Box::new(Segment::Descendant(Box::new(Segment::name("a")))));
        assert!(CompiledPath::compile(&JpQuery::new(vec![nested])).is_err());
    }

    #[test]
    fn locate_follows_rfc9535_and_the_proxy_post_processing() {
        let src = br#"{"a":{"b":[10,{"a":1},[2,3]],"c":"x"},"b":[{"a":{"a":2}}],"ssn":"1"}"#;
        let doc = scan(src, 8).unwrap();
        assert_eq!(locations(&doc, "$.ssn"), vec![vec![k("ssn")]]);
        assert_eq!(locations(&doc, "$"), vec![vec![]]);
        assert_eq!(
            locations(&doc, "$.a.b[1].a"),
            vec![vec![k("a"), k("b"), i(1), k("a")]]
        );
        assert_eq!(
            locations(&doc, "$.a.b[-1]"),
            vec![vec![k("a"), k("b"), i(2)]]
        );
        assert_eq!(
            locations(&doc, "$.a.b[-3]"),
            vec![vec![k("a"), k("b"), i(0)]]
        );
        assert_eq!(locations(&doc, "$.a.b[-4]"), Vec::<Vec<Step>>::new());
        assert_eq!(locations(&doc, "$.a.b[3]"), Vec::<Vec<Step>>::new());
        assert_eq!(
            locations(&doc, "$.a.b.a"),
            Vec::<Vec<Step>>::new(),
            "name on an array"
        );
        assert_eq!(
            locations(&doc, "$.a[0]"),
            Vec::<Vec<Step>>::new(),
            "index on an object"
        );
        assert_eq!(
            locations(&doc, "$.a.c.x"),
            Vec::<Vec<Step>>::new(),
            "name on a string"
        );
        assert_eq!(
            locations(&doc, "$.*"),
            vec![vec![k("a")], vec![k("b")], vec![k("ssn")]]
        );
        assert_eq!(
            locations(&doc, "$.a.b[*]"),
            vec![
                vec![k("a"), k("b"), i(0)],
                vec![k("a"), k("b"), i(1)],
                vec![k("a"), k("b"), i(2)]
            ]
        );
        // Union: grouped by selector, then sorted by depth (stable).
        assert_eq!(
            locations(&doc, "$['ssn','a']"),
            vec![vec![k("ssn")], vec![k("a")]]
        );
        assert_eq!(
            locations(&doc, "$['a','a']"),
            vec![vec![k("a")]],
            "duplicates dropped"
        );
        // Descendants: $['a'] swallows everything below it; $['b'][0]['a'] swallows its child.
        assert_eq!(
            locations(&doc, "$..a"),
            vec![vec![k("a")], vec![k("b"), i(0), k("a")]]
        );
        assert_eq!(
            locations(&doc, "$..[0]"),
            vec![
                vec![k("b"), i(0)],
                vec![k("a"), k("b"), i(0)],
                vec![k("a"), k("b"), i(2), i(0)]
            ]
        );
        assert_eq!(
            locations(&doc, "$.a..a"),
            vec![vec![k("a"), k("b"), i(1), k("a")]]
        );
        // Relative evaluation: `from` plays `$`.
        let b0 = doc.index(doc.member(doc.root(), "b").unwrap(), 0).unwrap();
        let found: Vec<_> = path("$..a")
            .locate(&doc, b0)
            .into_iter()
            .map(|n| doc.location(n))
            .collect();
        assert_eq!(found, vec![vec![k("b"), i(0), k("a")]]);
        assert_eq!(
            path("$..*").locate(&doc, doc.member(doc.root(), "ssn").unwrap()),
            vec![]
        );
    }

    #[test]
    fn locate_matches_escaped_keys_by_name() {
        let doc = scan(br#"{"\u0073sn":"1","it's":{"a\nb":2}}"#, 4).unwrap();
        assert_eq!(locations(&doc, "$.ssn"), vec![vec![k("ssn")]]);
        assert_eq!(
            locations(&doc, "$['it\\'s']['a\\nb']"),
            vec![vec![k("it's"), k("a\nb")]]
        );
        assert_eq!(
            locations(&doc, "$..['a\\nb']"),
            vec![vec![k("it's"), k("a\nb")]]
        );
    }

    #[test]
    fn extreme_indexes_select_nothing() {
        let doc = scan(b"[1,2]", 4).unwrap();
        for idx in [i64::MIN, i64::MAX, -3, 2] {
            let cp =
                CompiledPath::compile(&JpQuery::new(vec![Segment::Selector(Selector::Index(idx))]))
                    .unwrap();
            assert_eq!(cp.locate(&doc, doc.root()), vec![], "{idx}");
        }
    }

    #[test]
    fn may_overlap_cases() {
        let cases = [
            ("$.a", "$.a", true),
            ("$.a", "$.a.b", true),
            ("$.a.b", "$.a", true),
            ("$", "$.x", true),
            ("$.a", "$.b", false),
            ("$.a.b", "$.a.c", false),
            ("$.a.b", "$.b.b", false),
            ("$.*", "$.a.b", true),
            ("$[*]", "$.a", true),
            ("$[0]", "$[0].x", true),
            ("$[0]", "$[1]", false),
            ("$[-1]", "$[1]", true),
            ("$[-1]", "$[-2]", true),
            ("$[0]", "$.a", false),
            ("$['a','b']", "$.b.c", true),
            ("$['a','b']", "$.c", false),
            ("$[0,1]", "$[2,'x']", false),
            ("$.x[0]", "$.x.a", false),
            // Descendant segments.
            ("$..a", "$.b", true),
            ("$..a", "$.b.c", true),
            ("$.a..b", "$.c", false),
            ("$.a..b", "$.a", true),
            ("$.a..b", "$.a.x", true),
            ("$.a..b", "$.c.a.b", false),
            ("$..[0]", "$.a.b", true),
            ("$..a", "$..b", true),
        ];
        for (a, b, want) in cases {
            assert_eq!(may_overlap(&path(a), &path(b)), want, "{a} vs {b}");
            assert_eq!(may_overlap(&path(b), &path(a)), want, "{b} vs {a}");
        }
    }

    #[test]
    fn locations_agree_with_location() {
        let text = r#"{"a":[1,{"b":[true,{"c\u0041":null}]},[[],[2]]],"d":{"e":{"f":[3,4,5]}}}"#;
        let doc = scan(text.as_bytes(), 64).unwrap();
        let all: Vec<NodeId> = path("$..*").locate(&doc, doc.root());
        let every: Vec<NodeId> = (0..doc.len() as u32).map(NodeId).collect();
        for nodes in [all, every] {
            let one_by_one: Vec<Vec<Step>> = nodes.iter().map(|&n| doc.location(n)).collect();
            assert_eq!(doc.locations(&nodes), one_by_one);
        }
        assert_eq!(
            doc.locations(&[doc.root()]),
            vec![Vec::<Step>::new()],
            "the root's location is empty"
        );
    }

    // ---- splicing --------------------------------------------------------------------------

    #[test]
    fn splice_replaces_ranges_in_any_order() {
        let src = b"{\"a\":1,\"b\":22,\"c\":333}";
        let mut edits = vec![
            (18..21, b"\"z\"".to_vec()),
            (5..6, b"\"x\"".to_vec()),
            (11..13, Vec::new()),
        ];
        let out = splice(src, &mut edits).unwrap();
        assert_eq!(out, b"{\"a\":\"x\",\"b\":,\"c\":\"z\"}");
        assert_eq!(out.capacity(), out.len(), "allocated once, exactly");
        assert_eq!(
            splice(src, &mut Vec::<(Range<usize>, Vec<u8>)>::new()).unwrap(),
            src
        );
        // Insertions, including at the same place as a replacement.
        let mut edits = vec![(1..2, &b"B"[..]), (1..1, b"x"), (1..1, b"y"), (3..3, b"!")];
        assert_eq!(splice(b"abc", &mut edits).unwrap(), b"axyBc!");
    }

    #[test]
    fn splice_refuses_overlaps_and_out_of_bounds() {
        let src = b"0123456789";
        let bad = |mut edits: Vec<(Range<usize>, &[u8])>| splice(src, &mut edits).unwrap_err();
        assert_eq!(bad(vec![(2..5, b""), (4..6, b"")]), SpliceError::Overlap(4));
        assert_eq!(bad(vec![(4..6, b""), (2..8, b"")]), SpliceError::Overlap(4));
        assert_eq!(bad(vec![(3..4, b""), (3..4, b"")]), SpliceError::Overlap(3));
        assert_eq!(
            bad(vec![(2..4, b""), (3..3, b"x")]),
            SpliceError::Overlap(3)
        );
        // Adjacent is not overlapping.
        let mut adjacent = [(2..3, &b"x"[..]), (3..3, b"y"), (2..2, b"z")];
        assert_eq!(splice(src, &mut adjacent).unwrap(), b"01zxy3456789");
        assert!(matches!(
            bad(vec![(9..11, b"")]),
            SpliceError::OutOfBounds { .. }
        ));
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 5..4;
        assert!(matches!(
            bad(vec![(reversed, b"")]),
            SpliceError::OutOfBounds { .. }
        ));
        assert!(splice(src, &mut [(10..10, b"end")]).is_ok());
    }

    // ---- property tests ---------------------------------------------------------------------

    fn ws() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["", "", "", " ", "\n", "\t", "\r", " \r\n "])
    }

    fn string_lit() -> impl Strategy<Value = String> {
        let parts = vec![
            "a",
            "b",
            "Z",
            " ",
            "é",
            "日本",
            "😀",
            "'",
            "\u{7f}",
            "\\n",
            "\\\"",
            "\\\\",
            "\\/",
            "\\b",
            "\\f",
            "\\r",
            "\\t",
            "\\u0041",
            "\\u00e9",
            "\\u0000",
            "\\ud83d\\ude00",
            "\\uD83D\\uDE00",
            "\\u2028",
        ];
        prop::collection::vec(prop::sample::select(parts), 0..6)
            .prop_map(|p| format!("\"{}\"", p.concat()))
    }

    fn key_lit() -> impl Strategy<Value = String> {
        let small = vec![
            "\"a\"",
            "\"b\"",
            "\"c\"",
            "\"\\u0061\"",
            "\"\\u0062\"",
            "\"\"",
            "\"a/\"",
            "\"a\\/\"",
        ];
        prop_oneof![
            4 => prop::sample::select(small).prop_map(String::from),
            1 => string_lit(),
        ]
    }

    /// Keys of a large object: distinct, in random spellings, and sometimes with one duplicate
    /// of an earlier key appended, so the duplicate shows up after the switch to the hash set.
    fn big_keys() -> impl Strategy<Value = Vec<String>> {
        (
            prop::collection::btree_set(0..1000u32, 14..60),
            prop::collection::vec(any::<bool>(), 61),
            any::<Option<prop::sample::Index>>(),
        )
            .prop_map(|(distinct, escape, dup)| {
                let mut keys: Vec<u32> = distinct.into_iter().collect();
                if let Some(ix) = dup {
                    keys.push(keys[ix.index(keys.len())]);
                }
                keys.iter()
                    .zip(escape)
                    .map(|(n, e)| {
                        if e {
                            format!("\"\\u006b{n}\"")
                        } else {
                            format!("\"k{n}\"")
                        }
                    })
                    .collect()
            })
    }

    fn leaf_lit() -> BoxedStrategy<String> {
        prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            "-?(0|[1-9][0-9]{0,5})(\\.[0-9]{1,4})?([eE][+-]?[0-9]{1,3})?",
            string_lit(),
        ]
        .boxed()
    }

    /// JSON text built token by token, with random whitespace and escapes, and often
    /// duplicate keys (small key alphabet, escaped spellings).
    fn json_text() -> BoxedStrategy<String> {
        leaf_lit()
            .prop_recursive(5, 48, 6, |inner| {
                let array =
                    prop::collection::vec((ws(), inner.clone(), ws()), 0..6).prop_map(|items| {
                        let items: Vec<String> = items
                            .into_iter()
                            .map(|(a, v, b)| format!("{a}{v}{b}"))
                            .collect();
                        format!("[{}]", items.join(","))
                    });
                let object = prop::collection::vec((ws(), key_lit(), ws(), inner.clone()), 0..6)
                    .prop_map(|members| {
                        let members: Vec<String> = members
                            .into_iter()
                            .map(|(a, k, b, v)| format!("{a}{k}{b}:{v}"))
                            .collect();
                        format!("{{{}}}", members.join(","))
                    });
                let big =
                    (big_keys(), prop::collection::vec(inner, 61)).prop_map(|(keys, values)| {
                        let members: Vec<String> = keys
                            .into_iter()
                            .zip(values)
                            .map(|(k, v)| format!("{k}:{v}"))
                            .collect();
                        format!("{{{}}}", members.join(","))
                    });
                prop_oneof![3 => array, 3 => object, 1 => big]
            })
            .prop_flat_map(|v| (ws(), Just(v), ws()).prop_map(|(a, v, b)| format!("{a}{v}{b}")))
            .boxed()
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Delete(usize),
        Insert(usize, u8),
        Replace(usize, u8),
        Truncate(usize),
        Duplicate(usize, usize),
    }

    fn interesting_byte() -> impl Strategy<Value = u8> {
        let mut bytes = b"{}[]:,\"\\ \t\n0123456789-+.eEtrufalsn/ubx'".to_vec();
        bytes.extend_from_slice(&[
            0x00, 0x0b, 0x1f, 0x7f, 0x80, 0xbf, 0xc3, 0xe2, 0xed, 0xf0, 0xff,
        ]);
        prop::sample::select(bytes)
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            any::<usize>().prop_map(Mutation::Delete),
            (any::<usize>(), interesting_byte()).prop_map(|(p, b)| Mutation::Insert(p, b)),
            (any::<usize>(), interesting_byte()).prop_map(|(p, b)| Mutation::Replace(p, b)),
            any::<usize>().prop_map(Mutation::Truncate),
            (any::<usize>(), any::<usize>()).prop_map(|(p, l)| Mutation::Duplicate(p, l)),
        ]
    }

    fn mutate(mut v: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
        for m in mutations {
            let at = |p: usize, len: usize| p % (len + 1);
            match *m {
                Mutation::Delete(p) if !v.is_empty() => {
                    let p = p % v.len();
                    v.remove(p);
                }
                Mutation::Insert(p, b) => {
                    let p = at(p, v.len());
                    v.insert(p, b);
                }
                Mutation::Replace(p, b) if !v.is_empty() => {
                    let p = p % v.len();
                    v[p] = b;
                }
                Mutation::Truncate(p) => {
                    let p = at(p, v.len());
                    v.truncate(p);
                }
                Mutation::Duplicate(p, l) => {
                    let p = at(p, v.len());
                    let l = l % 8;
                    let piece: Vec<u8> = v[p..(p + l).min(v.len())].to_vec();
                    v.splice(p..p, piece);
                }
                _ => {}
            }
        }
        v
    }

    /// Accept/reject must agree exactly with serde_json plus the two extra rules, and, against
    /// plain serde_json, differ only by those rules; an accepted document must read the same
    /// as serde_json's `Value` of it.
    fn check_agreement(input: &[u8], max_depth: usize) -> Result<(), TestCaseError> {
        let ours = scan(input, max_depth);
        let text = String::from_utf8_lossy(input);
        // The validator (with its string fast path) says what the scan says, fresh or reused.
        let mut validator = Validator::default();
        prop_assert_eq!(
            validator.check(input, max_depth).is_ok(),
            ours.is_ok(),
            "{:?}",
            text
        );
        prop_assert_eq!(
            validator.check(input, max_depth).is_ok(),
            ours.is_ok(),
            "{:?}",
            text
        );
        prop_assert_eq!(
            ours.is_ok(),
            oracle::accepts(input, max_depth),
            "{:?} -> {:?}",
            text,
            ours
        );
        let plain = serde_accepts(input);
        match &ours {
            Ok(doc) => {
                prop_assert!(plain);
                let rebuilt = serde_json::to_string(&to_value(doc, doc.root())).unwrap();
                let theirs =
                    serde_json::to_string(&serde_json::from_slice::<Value>(input).unwrap())
                        .unwrap();
                prop_assert_eq!(rebuilt, theirs);
                prop_assert_eq!(
                    doc.raw_str(doc.root()),
                    text.trim_matches([' ', '\t', '\n', '\r'])
                );
            }
            Err(JsonError::Syntax { .. }) => prop_assert!(!plain, "{:?} -> {:?}", text, ours),
            Err(JsonError::DuplicateKey { .. } | JsonError::TooDeep(_)) => {}
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn scan_agrees_with_serde_on_generated_json(src in json_text(), max_depth in 0usize..8) {
            check_agreement(src.as_bytes(), max_depth)?;
        }

        #[test]
        fn scan_agrees_with_serde_on_mutated_json(
            src in json_text(),
            mutations in prop::collection::vec(mutation(), 1..4),
            max_depth in 0usize..8,
        ) {
            check_agreement(&mutate(src.into_bytes(), &mutations), max_depth)?;
        }

        #[test]
        fn scan_agrees_with_serde_on_noise(
            src in prop::collection::vec(interesting_byte(), 0..24),
            max_depth in 0usize..8,
        ) {
            check_agreement(&src, max_depth)?;
        }
    }

    // ---- property tests: JSONPath ----------------------------------------------------------

    /// The proxy's reference pipeline (jsonpath_rust on a serde_json Value, normalized paths
    /// parsed back into steps, then the dedup/nesting post-processing), verbatim.
    fn reference(q: &JpQuery, doc: &Value) -> Vec<Vec<Step>> {
        let found = jsonpath_rust::query::js_path_process(q, doc).unwrap();
        let mut locations: Vec<Vec<Step>> = found
            .into_iter()
            .map(|r| parse_normalized(&r.path).unwrap())
            .collect();
        locations.sort_by_key(|l| l.len());
        let mut out: Vec<Vec<Step>> = Vec::new();
        for loc in locations {
            if !out.iter().any(|o| loc.starts_with(o)) {
                out.push(loc);
            }
        }
        out
    }

    fn parse_normalized(path: &str) -> Option<Vec<Step>> {
        let mut rest = path.strip_prefix('$')?;
        let mut steps = Vec::new();
        while !rest.is_empty() {
            rest = rest.strip_prefix('[')?;
            if let Some(r) = rest.strip_prefix('\'') {
                let mut name = String::new();
                let mut chars = r.char_indices();
                let end = loop {
                    let (i, c) = chars.next()?;
                    match c {
                        '\'' => break i,
                        '\\' => {
                            let (_, e) = chars.next()?;
                            match e {
                                'b' => name.push('\u{8}'),
                                'f' => name.push('\u{c}'),
                                'n' => name.push('\n'),
                                'r' => name.push('\r'),
                                't' => name.push('\t'),
                                'u' => {
                                    let hex: String = (0..4)
                                        .filter_map(|_| chars.next().map(|(_, c)| c))
                                        .collect();
                                    name.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                                }
                                other => name.push(other),
                            }
                        }
                        c => name.push(c),
                    }
                };
                rest = r[end + 1..].strip_prefix(']')?;
                steps.push(Step::Key(name));
            } else {
                let end = rest.find(']')?;
                steps.push(Step::Index(rest[..end].parse().ok()?));
                rest = &rest[end + 1..];
            }
        }
        Some(steps)
    }

    const KEYS: &[&str] = &["a", "b", "c", "it's", "\n", "é"];

    fn value_doc() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-5i64..100).prop_map(Value::from),
            "[a-c]{0,2}".prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 40, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((prop::sample::select(KEYS), inner), 0..5).prop_map(|kv| {
                    Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                }),
            ]
        })
    }

    fn segment_text() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            ".a",
            ".b",
            "['b']",
            "['c']",
            "['it\\'s']",
            "['\\n']",
            "[0]",
            "[1]",
            "[-1]",
            "[-2]",
            ".*",
            "[*]",
            "['a','b']",
            "[0,1]",
            "['a',0]",
            "[*,0]",
            "['c','c']",
            "[-1,0]",
            "..a",
            "..b",
            "..*",
            "..[0]",
            "..[-1]",
            "..['a','b']",
            "..[*]",
            "..[0,'c']",
        ])
    }

    fn path_text() -> impl Strategy<Value = String> {
        prop::collection::vec(segment_text(), 0..=4).prop_map(|s| format!("${}", s.concat()))
    }

    fn value_at<'v>(v: &'v Value, loc: &[Step]) -> &'v Value {
        loc.iter().fold(v, |v, s| match s {
            Step::Key(k) => &v[k.as_str()],
            Step::Index(i) => &v[*i],
        })
    }

    fn value_at_mut<'v>(v: &'v mut Value, loc: &[Step]) -> &'v mut Value {
        loc.iter().fold(v, |v, s| match s {
            Step::Key(k) => &mut v[k.as_str()],
            Step::Index(i) => &mut v[*i],
        })
    }

    fn doc_text(v: &Value, pretty: bool) -> String {
        if pretty {
            serde_json::to_string_pretty(v).unwrap()
        } else {
            serde_json::to_string(v).unwrap()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// `locate` returns exactly the reference's locations, in the reference's order; the
        /// result is shallowest first with no location inside another.
        #[test]
        fn locate_matches_jsonpath_rust(v in value_doc(), p in path_text(), pretty in any::<bool>()) {
            let text = doc_text(&v, pretty);
            let q = parse_json_path(&p).unwrap();
            let want = reference(&q, &v);
            let doc = scan(text.as_bytes(), 64).unwrap();
            let got: Vec<Vec<Step>> = CompiledPath::compile(&q)
                .unwrap()
                .locate(&doc, doc.root())
                .into_iter()
                .map(|n| doc.location(n))
                .collect();
            prop_assert_eq!(&got, &want, "path {} on {}", p, text);
            let as_set = |l: &[Vec<Step>]| l.iter().cloned().collect::<std::collections::BTreeSet<_>>();
            prop_assert_eq!(as_set(&got), as_set(&want));
            for (n, a) in got.iter().enumerate() {
                for b in &got[..n] {
                    prop_assert!(b.len() <= a.len(), "not shallowest first");
                    prop_assert!(!a.starts_with(b), "{:?} inside {:?}", a, b);
                }
            }
        }

        /// Evaluating from an inner node is evaluating on that subdocument.
        #[test]
        fn locate_from_inner_node(v in value_doc(), p in path_text(), pick in any::<usize>()) {
            let text = doc_text(&v, false);
            let doc = scan(text.as_bytes(), 64).unwrap();
            let from = NodeId((pick % doc.len()) as u32);
            let prefix = doc.location(from);
            let q = parse_json_path(&p).unwrap();
            let want = reference(&q, value_at(&v, &prefix));
            let got: Vec<Vec<Step>> = CompiledPath::compile(&q)
                .unwrap()
                .locate(&doc, from)
                .into_iter()
                .map(|n| {
                    prop_assert!(doc.contains(from, n));
                    Ok(doc.location(n)[prefix.len()..].to_vec())
                })
                .collect::<Result<_, TestCaseError>>()?;
            prop_assert_eq!(got, want);
        }

        /// Splicing replacements at the located spans gives the document the DOM path
        /// produces by replacing the values at the reference locations.
        #[test]
        fn splice_matches_dom_replacement(v in value_doc(), p in path_text(), pretty in any::<bool>()) {
            let text = doc_text(&v, pretty);
            let q = parse_json_path(&p).unwrap();
            let mut dom = v.clone();
            for loc in reference(&q, &v) {
                *value_at_mut(&mut dom, &loc) = Value::String("enc:v1:X".into());
            }
            let doc = scan(text.as_bytes(), 64).unwrap();
            let mut edits: Vec<(Range<usize>, &[u8])> = CompiledPath::compile(&q)
                .unwrap()
                .locate(&doc, doc.root())
                .into_iter()
                .map(|n| (doc.span(n), &b"\"enc:v1:X\""[..]))
                .collect();
            let out = splice(text.as_bytes(), &mut edits).unwrap();
            let spliced: Value = serde_json::from_slice(&out).unwrap();
            prop_assert_eq!(serde_json::to_string(&spliced).unwrap(), serde_json::to_string(&dom).unwrap());
        }

        /// `may_overlap` is sound: whenever two paths' matches nest in some document, it says so.
        #[test]
        fn may_overlap_is_sound(v in value_doc(), a in path_text(), b in path_text()) {
            let text = doc_text(&v, false);
            let doc = scan(text.as_bytes(), 64).unwrap();
            let (ca, cb) = (path(&a), path(&b));
            let (ma, mb) = (ca.locate(&doc, doc.root()), cb.locate(&doc, doc.root()));
            let nested = ma.iter().any(|&x| mb.iter().any(|&y| doc.contains(x, y) || doc.contains(y, x)));
            if nested {
                prop_assert!(may_overlap(&ca, &cb) && may_overlap(&cb, &ca), "{} vs {} on {}", a, b, text);
            }
        }
    }
}
