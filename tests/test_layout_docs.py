"""The byte layout in the docs is the compiled one, and enough to use a ring.

docs/ring.md, docs/arena.md and docs/protocol.md give every shared struct as
a table after a ``<!-- layout: NAME -->`` marker, in the columns
``| field | offset | size | type | meaning |``, and the constants in tables
``| constant | value | meaning |`` after ``<!-- layout: constants -->``.
These tests hold them to three sources: the compiler's offsets and sizes
(``tensorbus._core.offsets.layout()``), the field names and C types of
``_core/tb_layout.h``, and the ring itself: a publisher and a subscriber
written from the doc tables alone meet the core's own in a real ring.
"""

import mmap
import os
import re
import struct
import time

import pytest

from tensorbus._core import BackpressureError
from tensorbus._core.offsets import layout

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOCS = os.path.join(ROOT, "docs")
HEADER = os.path.join(ROOT, "_core", "tb_layout.h")

STRUCT_COLUMNS = ["field", "offset", "size", "type", "meaning"]
CONSTANT_COLUMNS = ["constant", "value", "meaning"]
C_TYPES = {
    "uint64_t": "u64",
    "int64_t": "i64",
    "uint32_t": "u32",
    "uint16_t": "u16",
    "uint8_t": "u8",
    "char": "char",
    "tb_doorbell_t": "doorbell",
}
ELEMENT_BYTES = {"u64": 8, "i64": 8, "u32": 4, "u16": 2, "u8": 1, "char": 1, "doorbell": 16}
STRUCT_FORMATS = {"u64": "<Q", "i64": "<q", "u32": "<I", "u16": "<H"}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _bare(cell: str) -> str:
    return cell.strip("`")


def doc_tables() -> dict:
    """Every marked table of the docs: name -> list of (doc, rows), each row
    a dict by column. Constants tables may repeat; struct tables may not."""
    tables: dict[str, list] = {}
    for doc in sorted(os.listdir(DOCS)):
        if not doc.endswith(".md"):
            continue
        lines = open(os.path.join(DOCS, doc), encoding="utf-8").read().splitlines()
        for i, line in enumerate(lines):
            marker = re.fullmatch(r"<!-- layout: (\w+) -->", line.strip())
            if not marker:
                continue
            columns = _cells(lines[i + 1])
            want = CONSTANT_COLUMNS if marker[1] == "constants" else STRUCT_COLUMNS
            assert columns == want, f"{doc}: table {marker[1]} has columns {columns}"
            assert set(lines[i + 2].replace("|", "").split()) == {"---"}, doc
            rows = []
            for row in lines[i + 3 :]:
                if not row.startswith("|"):
                    break
                # "\|" is a literal bar inside a cell (`seq \| TB_WRITING`)
                cells = [c.replace("\x00", "|") for c in _cells(row.replace("\\|", "\x00"))]
                assert len(cells) == len(columns), f"{doc}: {row}"
                rows.append(dict(zip(columns, cells, strict=True)))
            tables.setdefault(marker[1], []).append((doc, rows))
    return tables


def doc_structs() -> dict:
    """struct -> field -> (offset, size, type), as the docs give them."""
    out = {}
    for name, found in doc_tables().items():
        if name == "constants":
            continue
        assert len(found) == 1, f"struct {name} is documented in {[d for d, _ in found]}"
        doc, rows = found[0]
        fields = {}
        for row in rows:
            field = _bare(row["field"])
            assert field not in fields, f"{doc}: {name}.{field} twice"
            fields[field] = (int(row["offset"]), int(row["size"]), row["type"])
        out[name] = fields
    return out


def doc_constants() -> dict:
    out = {}
    for doc, rows in doc_tables()["constants"]:
        for row in rows:
            name, value = _bare(row["constant"]), int(_bare(row["value"]), 0)
            assert out.setdefault(name, value) == value, f"{doc}: {name} given twice, differently"
    return out


def header_structs(constants: dict) -> dict:
    """C typedef -> field -> our type name (``u32``, ``i64[8]``, ...), read
    from tb_layout.h; padding and reserved fields (``_...``) left out."""
    text = re.sub(r"/\*.*?\*/", "", open(HEADER, encoding="utf-8").read(), flags=re.S)
    out = {}
    for body, ctype in re.findall(r"typedef struct \{(.*?)\}\s*(\w+);", text, flags=re.S):
        fields = {}
        for decl in filter(None, (d.strip() for d in body.split(";"))):
            m = re.fullmatch(r"(\w+)\s+(\w+)(?:\[([^\]]+)\])?", decl)
            assert m, f"{ctype}: cannot read the declaration {decl!r}"
            c_type, field, count = m.groups()
            if field.startswith("_"):
                continue
            kind = C_TYPES[c_type]
            if count is not None:
                kind += f"[{constants[count] if count in constants else int(count)}]"
            fields[field] = kind
        out[ctype] = fields
    return out


def header_constants() -> set:
    """The names tb_layout.h defines: #define'd values and enum members."""
    text = re.sub(r"/\*.*?\*/", "", open(HEADER, encoding="utf-8").read(), flags=re.S)
    names = set(re.findall(r"^#define (TB_\w+) ", text, flags=re.M))
    for body in re.findall(r"enum \{(.*?)\}", text, flags=re.S):
        names |= set(re.findall(r"(TB_\w+)\s*=", body))
    return names


COMPILED = layout()


@pytest.mark.parametrize("name", sorted(COMPILED["structs"]))
def test_each_struct_is_documented_with_the_compiled_offsets_and_sizes(name):
    compiled = COMPILED["structs"][name]["fields"]
    documented = doc_structs().get(name)
    assert documented is not None, f"no docs table <!-- layout: {name} -->"
    assert set(documented) == set(compiled), (
        f"{name}: fields missing from the docs {sorted(set(compiled) - set(documented))}, "
        f"not in the struct {sorted(set(documented) - set(compiled))}"
    )
    for field, (offset, size) in compiled.items():
        assert documented[field][:2] == (offset, size), f"{name}.{field}"
    offsets = [documented[f][0] for f in documented]
    assert offsets == sorted(offsets), f"{name}: rows are not in offset order"


def test_no_docs_table_names_a_struct_the_core_does_not_have():
    assert set(doc_structs()) <= set(COMPILED["structs"])


def test_the_export_covers_every_field_and_constant_of_tb_layout_h():
    """A field or constant added to tb_layout.h without a row in offsets.pyx
    (and so in the docs) fails here."""
    header = header_structs(COMPILED["constants"])
    exported = {s["ctype"]: set(s["fields"]) for s in COMPILED["structs"].values()}
    assert set(header) == set(exported), "a struct of tb_layout.h is not exported"
    for ctype, fields in header.items():
        assert set(fields) == exported[ctype], ctype
    assert header_constants() == set(COMPILED["constants"]), "a constant is not exported"


def test_the_docs_give_each_field_its_c_type():
    header = header_structs(COMPILED["constants"])
    for name, fields in doc_structs().items():
        c_fields = header[COMPILED["structs"][name]["ctype"]]
        for field, (_, size, kind) in fields.items():
            assert kind == c_fields[field], f"{name}.{field}: {kind} in the docs"
            m = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", kind)
            assert ELEMENT_BYTES[m[1]] * int(m[2] or 1) == size, f"{name}.{field}"


def test_every_constant_is_documented_with_its_value():
    documented = doc_constants()
    compiled = COMPILED["constants"]
    assert sorted(set(compiled) - set(documented)) == [], "constants missing from the docs"
    assert sorted(set(documented) - set(compiled)) == [], "documented constants not in the core"
    for name, value in compiled.items():
        assert documented[name] == value, name


def test_offsets_quoted_in_prose_match_the_ring_header():
    """Prose like "the `responders` field (u32, offset 216)" names a ring
    header field; it must agree with the table."""
    ring_header = doc_structs()["ring_header"]
    quoted = []
    for doc in sorted(os.listdir(DOCS)):
        if not doc.endswith(".md"):
            continue  # docs/img/, the dashboard's JSON
        text = open(os.path.join(DOCS, doc), encoding="utf-8").read()
        quoted += re.findall(r"`(\w+)`\s+field \((\w+), offset (\d+)\)", text)
    assert quoted, "the docs quote the responders field's offset (reqrep.md)"
    for field, kind, offset in quoted:
        assert ring_header[field][::2] == (int(offset), kind), field


def test_the_documented_sizes_are_the_entry_strides():
    c = doc_constants()
    structs = COMPILED["structs"]
    assert structs["cursor"]["size"] == c["TB_CURSOR_BYTES"]
    assert structs["publisher"]["size"] == c["TB_PUBLISHER_BYTES"]
    assert structs["slot_header"]["size"] == c["TB_SLOT_HEADER_BYTES"]
    assert structs["ring_header"]["size"] <= c["TB_HEADER_BYTES"]
    assert structs["bell"]["size"] == structs["bells_header"]["size"] == c["TB_BELL_BYTES"]
    assert structs["tensor_desc"]["size"] == c["TB_DESC_BYTES"]
    assert structs["block"]["size"] == c["TB_ARENA_BLOCK_BYTES"]


# ---------------------------------------------------------------------------
# A third-party client, from the doc tables alone
# ---------------------------------------------------------------------------


class DocRing:
    """A ring mapped with mmap and read and written by the docs' tables:
    field offsets, types and constants all come from docs/*.md. Plain loads
    and stores stand in for the atomics: each test drives one side at a
    time, so nothing races."""

    def __init__(self, name: str):
        self.fields = doc_structs()
        self.c = doc_constants()
        with open(f"/dev/shm/{name}", "r+b") as f:
            self.buf = mmap.mmap(f.fileno(), 0)
        assert self.get("ring_header", 0, "magic") == self.c["TB_RING_MAGIC"]
        assert self.get("ring_header", 0, "version") == self.c["TB_RING_VERSION"]
        h = {f: self.get("ring_header", 0, f) for f in self.fields["ring_header"] if f != "space"}
        self.h = h
        assert h["segment_size"] == len(self.buf)

    def close(self):
        self.buf.close()

    def _where(self, name, base, field):
        path = field.split(".")
        offset, size, kind = self.fields[name][path[0]]
        if len(path) == 2:  # a doorbell inside a header or cursor
            inner, size, kind = self.fields[kind][path[1]]
            offset += inner
        return base + offset, size, kind

    def get(self, name, base, field):
        at, _, kind = self._where(name, base, field)
        return struct.unpack_from(STRUCT_FORMATS[kind], self.buf, at)[0]

    def put(self, name, base, field, value):
        at, _, kind = self._where(name, base, field)
        struct.pack_into(STRUCT_FORMATS[kind], self.buf, at, value)

    def zero(self, name, base, field):
        at, size, _ = self._where(name, base, field)
        self.buf[at : at + size] = bytes(size)

    # geometry, by the docs' formulas
    def cursor(self, i):
        return self.h["cursors_offset"] + self.c["TB_CURSOR_BYTES"] * i

    def record(self, j):
        return self.h["publishers_offset"] + self.c["TB_PUBLISHER_BYTES"] * j

    def slot(self, seq):
        return self.h["slots_offset"] + (seq & (self.h["capacity"] - 1)) * self.h["slot_stride"]

    def payload(self, seq, n):
        at = self.slot(seq) + self.c["TB_SLOT_HEADER_BYTES"]
        return bytes(self.buf[at : at + n])

    def head(self):
        return self.get("ring_header", 0, "head")

    # publisher records
    def take_record(self):
        for j in range(self.h["max_publishers"]):
            rec = self.record(j)
            if self.get("publisher", rec, "state") == self.c["TB_PUB_FREE"]:
                self.put("publisher", rec, "state", self.c["TB_PUB_IDLE"])
                self.put("publisher", rec, "owner_pid", os.getpid())
                for counter in ("published", "dropped", "bytes"):
                    self.put("publisher", rec, counter, 0)
                self.put("publisher", rec, "seq", -1)
                if self.get("ring_header", 0, "publisher_hwm") < j + 1:
                    self.put("ring_header", 0, "publisher_hwm", j + 1)
                return j
        raise AssertionError("no free publisher record")

    def free_record(self, j):
        self.put("publisher", self.record(j), "state", self.c["TB_PUB_FREE"])

    def slowest(self, head):
        low = head
        for i in range(self.get("ring_header", 0, "cursor_hwm")):
            if self.get("cursor", self.cursor(i), "state") == self.c["TB_CURSOR_ACTIVE"]:
                low = min(low, self.get("cursor", self.cursor(i), "position"))
        return low

    def fill(self, j, seq, data):
        """Write the slot header and payload of ``seq`` (claimed by record j)."""
        s = self.slot(seq)
        self.put("slot_header", s, "length", len(data))
        self.put("slot_header", s, "type", self.c["TB_MSG_INLINE"])
        self.put("slot_header", s, "flags", 0)
        self.put("slot_header", s, "timestamp_ns", time.time_ns())
        self.put("slot_header", s, "publisher", j)
        at = s + self.c["TB_SLOT_HEADER_BYTES"]
        self.buf[at : at + len(data)] = data

    def count_publish(self, j, n):
        rec = self.record(j)
        self.put("publisher", rec, "published", self.get("publisher", rec, "published") + 1)
        self.put("publisher", rec, "bytes", self.get("publisher", rec, "bytes") + n)

    def publish_block(self, j, data):
        """ring.md, "Publishing on a block ring", uncontended."""
        rec, cap = self.record(j), self.h["capacity"]
        h = self.head()
        if h - self.slowest(h) >= cap:
            return None  # no credit
        prev = self.get("slot_header", self.slot(h), "commit")
        assert h - cap <= prev < h
        self.put("publisher", rec, "seq", h)
        self.put("publisher", rec, "state", self.c["TB_PUB_CLAIMING"])
        self.put("ring_header", 0, "head", h + 1)
        self.put("publisher", rec, "state", self.c["TB_PUB_CLAIMED"])
        self.fill(j, h, data)
        self.put("slot_header", self.slot(h), "commit", h)
        self.put("publisher", rec, "state", self.c["TB_PUB_IDLE"])
        self.count_publish(j, len(data))
        return h

    # cursors
    def join(self):
        for i in range(self.h["max_cursors"]):
            cur = self.cursor(i)
            if self.get("cursor", cur, "state") == self.c["TB_CURSOR_FREE"]:
                self.put("cursor", cur, "state", self.c["TB_CURSOR_JOINING"])
                self.put("cursor", cur, "owner_pid", os.getpid())
                self.put("cursor", cur, "generation", self.get("cursor", cur, "generation") + 1)
                for counter in ("drops", "received", "bell_ref", "flags", "bell.sleeping"):
                    self.put("cursor", cur, counter, 0)
                self.zero("cursor", cur, "latency")
                if self.get("ring_header", 0, "cursor_hwm") < i + 1:
                    self.put("ring_header", 0, "cursor_hwm", i + 1)
                while True:
                    h = self.head()
                    self.put("cursor", cur, "position", h)
                    self.put("cursor", cur, "state", self.c["TB_CURSOR_ACTIVE"])
                    if self.head() - h < self.h["capacity"]:
                        return i
        raise AssertionError("no free cursor")

    def read(self, i):
        """The read rule of ring.md: the next message's bytes, or None."""
        cur = self.cursor(i)
        p = self.get("cursor", cur, "position")
        s = self.slot(p)
        commit = self.get("slot_header", s, "commit")
        seq = commit & ~self.c["TB_WRITING"] if commit >= 0 else commit
        if commit == p:
            data = self.payload(p, self.get("slot_header", s, "length"))
            self.put("cursor", cur, "position", p + 1)
            self.put("cursor", cur, "received", self.get("cursor", cur, "received") + 1)
            return data
        if seq > p:  # lapped (overwrite rings)
            jump = max(self.head() - self.h["capacity"] // 2, p + 1)
            self.put("cursor", cur, "drops", self.get("cursor", cur, "drops") + jump - p)
            self.put("cursor", cur, "position", jump)
            return self.read(i)
        return None

    def free_cursor(self, i):
        self.put("cursor", self.cursor(i), "state", self.c["TB_CURSOR_FREE"])


@pytest.fixture
def doc_ring(make_ring):
    opened = []

    def make(**kwargs):
        ring = make_ring(**kwargs)
        view = DocRing(ring.name)
        opened.append(view)
        return ring, view

    yield make
    for view in opened:
        view.close()


def test_a_publisher_written_from_the_docs_is_read_and_counted_by_the_core(doc_ring):
    ring, doc = doc_ring(capacity=4, slot_size=64)
    sub = ring.subscriber()
    j = doc.take_record()
    assert [p["pid"] for p in ring.stats()["publishers"]] == [os.getpid()]
    sent = [b"first", b"second message", b"3"]
    for k, data in enumerate(sent):
        assert doc.publish_block(j, data) == k
        assert sub.recv(timeout=1) == data
        assert sub.last_seq == k
    (record,) = ring.stats()["publishers"]
    assert record["published"] == 3 and record["bytes"] == sum(map(len, sent))
    # The core's repair leaves a live owner's record alone.
    assert ring.repair()["records_freed"] == 0
    doc.free_record(j)
    assert ring.stats()["publishers"] == []
    sub.close()


def test_credit_by_the_docs_waits_for_the_core_subscriber(doc_ring):
    ring, doc = doc_ring(capacity=2, slot_size=16)
    sub = ring.subscriber()
    j = doc.take_record()
    assert doc.publish_block(j, b"a") == 0
    assert doc.publish_block(j, b"b") == 1
    assert doc.publish_block(j, b"c") is None  # a full ring: no credit
    assert sub.recv(timeout=1) == b"a"
    assert doc.publish_block(j, b"c") == 2
    doc.free_record(j)
    sub.close()


def test_a_subscriber_written_from_the_docs_reads_the_core_and_gives_credit(doc_ring):
    ring, doc = doc_ring(capacity=4, slot_size=64)
    pub = ring.publisher(timeout=0)
    i = doc.join()
    assert doc.read(i) is None  # commit is -1: nothing published yet
    for k in range(4):
        pub.send(b"m%d" % k)
    with pytest.raises(BackpressureError):
        pub.send(b"over", timeout=0)  # the docs' cursor holds the ring
    assert [doc.read(i) for _ in range(4)] == [b"m0", b"m1", b"m2", b"m3"]
    assert doc.read(i) is None
    (cursor,) = ring.stats()["cursors"]
    assert (cursor["index"], cursor["received"], cursor["lag"]) == (i, 4, 0)
    pub.send(b"fits again", timeout=0)
    doc.free_cursor(i)
    assert ring.stats()["cursors"] == []
    for _ in range(8):
        pub.send(b"x", timeout=0)  # a freed cursor holds nobody back
    pub.close()


def test_the_writing_bit_hides_a_slot_being_written_on_an_overwrite_ring(doc_ring):
    ring, doc = doc_ring(capacity=4, slot_size=64, policy="overwrite")
    sub = ring.subscriber()
    j = doc.take_record()
    rec = doc.record(j)
    doc.put("publisher", rec, "state", doc.c["TB_PUB_CLAIMING"])
    h = doc.head()
    doc.put("ring_header", 0, "head", h + 1)
    doc.put("publisher", rec, "seq", h)
    doc.put("publisher", rec, "state", doc.c["TB_PUB_CLAIMED"])
    prev = doc.get("slot_header", doc.slot(h), "commit")
    assert prev == -1  # below h and, although -1 has bit 62 set, no writer's mark
    doc.put("slot_header", doc.slot(h), "commit", h | doc.c["TB_WRITING"])
    doc.fill(j, h, b"half wr")
    assert sub.try_recv() is None  # being written: not readable yet
    doc.fill(j, h, b"whole message")
    doc.put("slot_header", doc.slot(h), "commit", h)
    doc.put("publisher", rec, "state", doc.c["TB_PUB_IDLE"])
    doc.count_publish(j, 13)
    assert sub.recv(timeout=1) == b"whole message"
    doc.free_record(j)
    sub.close()


def test_a_lapped_reader_by_the_docs_jumps_and_counts_drops(doc_ring):
    ring, doc = doc_ring(capacity=4, slot_size=16, policy="overwrite")
    i = doc.join()
    pub = ring.publisher()
    for k in range(7):
        pub.send(b"%d" % k)
    # Slot 0 now holds sequence 4: lapped, jump to head - capacity/2 = 5.
    assert [doc.read(i), doc.read(i), doc.read(i)] == [b"5", b"6", None]
    (cursor,) = ring.stats()["cursors"]
    assert (cursor["drops"], cursor["received"], cursor["position"]) == (5, 2, 7)
    doc.free_cursor(i)
    pub.close()


def test_the_space_doorbell_is_where_the_docs_say():
    structs = doc_structs()
    space = structs["ring_header"]["space"][0]
    ring_md = open(os.path.join(DOCS, "ring.md"), encoding="utf-8").read()
    m = re.search(
        r"its `seq` is at\s+offset (\d+) of the segment and its `sleeping` at (\d+)", ring_md
    )
    assert m, "ring.md says where the space doorbell's words are"
    assert int(m[1]) == space + structs["doorbell"]["seq"][0]
    assert int(m[2]) == space + structs["doorbell"]["sleeping"][0]


def test_the_geometry_formulas_of_the_docs_place_the_cores_messages(doc_ring):
    """Sanity for the geometry formulas: the payload of the core's message
    sits where the docs compute its slot."""
    ring, doc = doc_ring(capacity=8, slot_size=100)
    stride = (doc.c["TB_SLOT_HEADER_BYTES"] + 100 + 63) // 64 * 64
    assert doc.h["slot_stride"] == stride
    assert doc.h["cursors_offset"] == doc.c["TB_HEADER_BYTES"]
    pubs = doc.h["cursors_offset"] + doc.h["max_cursors"] * doc.c["TB_CURSOR_BYTES"]
    assert doc.h["publishers_offset"] == pubs
    align = doc.c["TB_SLOTS_ALIGN"]
    slots = -(-(pubs + doc.h["max_publishers"] * doc.c["TB_PUBLISHER_BYTES"]) // align) * align
    assert doc.h["slots_offset"] == slots
    assert doc.h["segment_size"] == slots + 8 * stride
    pub = ring.publisher()
    for k in range(11):
        pub.send(b"payload %d" % k)
    assert doc.payload(10, 10) == b"payload 10"
    assert doc.get("slot_header", doc.slot(10), "commit") == 10
    pub.close()
