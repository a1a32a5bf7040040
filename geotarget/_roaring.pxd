# cython: language_level=3
# The portable roaring format (RoaringFormatSpec), the one place the kernels read and write it.
#
# A serialised bitmap is: a cookie; with run containers (cookie 12347, container count - 1 in
# its top 16 bits) a bitset of which containers are runs; else (cookie 12346) a 32-bit count.
# Then per container its key's high 16 bits and cardinality - 1 (16 bits each); then, unless a
# bitmap with runs has fewer than 4 containers, a 32-bit offset per container; then the
# containers in order: an array (16-bit values) up to 4096 values, a bitset (8 KB) above, or a
# run list (16-bit count, then start and length - 1 per run).  ``_array_kernels`` writes it
# (``roaring_from_runs``) and reads it (``group_bitmap_by_app``), ``_refresh_kernels`` reads it
# (``bitmap_ranges``); ``audience._bitmap_from_ranges`` writes it in Python, with these constants.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy

cdef enum:
    RB_COOKIE_RUNS = 12347       # "has run containers"
    RB_COOKIE_NO_RUNS = 12346
    RB_OFFSETS_FROM = 4          # with run containers, fewer containers than this have no offsets
    RB_ARRAY_MAX = 4096          # larger containers that are not runs are 8 KB bitsets
    RB_BITSET_BYTES = 8192

cdef enum RbKind:
    RB_ARRAY = 0
    RB_BITSET = 1
    RB_RUN = 2


cdef inline uint16_t rb_u16(const uint8_t* p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v


cdef inline uint32_t rb_u32(const uint8_t* p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline int64_t rb_header_bytes(int64_t containers) noexcept nogil:
    # Bytes before the first container of a bitmap with run containers (what the writer emits).
    return 4 + (containers + 7) // 8 + 4 * containers + (4 * containers if containers >= RB_OFFSETS_FROM else 0)


cdef struct RbReader:
    const uint8_t* p
    Py_ssize_t nbytes
    Py_ssize_t size       # containers
    Py_ssize_t flags_at   # the run-container bitset (when has_run)
    Py_ssize_t desc_at    # the descriptive header
    Py_ssize_t at         # the next container's bytes
    bint has_run
    int64_t prev_high     # the previous container's key (they ascend)


cdef struct RbContainer:
    RbKind kind
    int64_t base          # its key's high 16 bits, shifted: the key of its value 0
    int64_t card
    Py_ssize_t at         # its bytes
    Py_ssize_t runs       # a run container's number of runs


cdef inline int rb_open(RbReader* r, const uint8_t* p, Py_ssize_t nbytes) except -1:
    # Read the header; ``ValueError`` on bytes that are not a portable roaring bitmap.
    cdef uint32_t cookie
    r.p, r.nbytes, r.flags_at, r.prev_high = p, nbytes, 0, -1
    if nbytes < 4:
        raise ValueError("roaring bitmap: truncated header")
    cookie = rb_u32(p)
    if (cookie & 0xFFFF) == RB_COOKIE_RUNS:
        r.has_run = True
        r.size = (cookie >> 16) + 1
        r.flags_at = 4
        r.at = 4 + (r.size + 7) // 8
    elif cookie == RB_COOKIE_NO_RUNS:
        if nbytes < 8:
            raise ValueError("roaring bitmap: truncated header")
        r.has_run = False
        r.size = rb_u32(p + 4)
        r.at = 8
    else:
        raise ValueError(f"roaring bitmap: unknown cookie {cookie}")
    r.desc_at = r.at
    if r.size > nbytes:   # every container takes bytes: also keeps the sums below from overflowing
        raise ValueError("roaring bitmap: truncated header")
    r.at += 4 * r.size
    if not r.has_run or r.size >= RB_OFFSETS_FROM:
        r.at += 4 * r.size   # the offsets: containers are read in order, so they are not needed
    if r.at > nbytes:
        raise ValueError("roaring bitmap: truncated header")
    return 0


cdef inline int rb_next(RbReader* r, Py_ssize_t i, RbContainer* c) except -1:
    # Container ``i`` (read in order, 0, 1, ...): its kind, keys and bytes, checked to lie inside
    # the buffer and to ascend; the reader moves past it.
    cdef const uint8_t* p = r.p
    cdef int64_t high = rb_u16(p + r.desc_at + 4 * i)
    if high <= r.prev_high:
        raise ValueError("roaring bitmap: containers out of order")
    r.prev_high = high
    c.base = high << 16
    c.card = <int64_t>rb_u16(p + r.desc_at + 4 * i + 2) + 1
    c.at = r.at
    c.runs = 0
    if r.has_run and (p[r.flags_at + i // 8] >> (i % 8)) & 1:
        c.kind = RB_RUN
        if r.at + 2 > r.nbytes:
            raise ValueError("roaring bitmap: truncated run container")
        c.runs = rb_u16(p + r.at)
        c.at = r.at + 2
        if c.at + 4 * c.runs > r.nbytes:
            raise ValueError("roaring bitmap: truncated run container")
        r.at = c.at + 4 * c.runs
    elif c.card > RB_ARRAY_MAX:
        c.kind = RB_BITSET
        if r.at + RB_BITSET_BYTES > r.nbytes:
            raise ValueError("roaring bitmap: truncated bitmap container")
        r.at += RB_BITSET_BYTES
    else:
        c.kind = RB_ARRAY
        if r.at + 2 * c.card > r.nbytes:
            raise ValueError("roaring bitmap: truncated array container")
        r.at += 2 * c.card
    return 0
