/* Gathers, sorts and roaring serialisation of key arrays (geotarget/_array_kernels.pyx). */
#ifndef GT_ARRAYS_HPP
#define GT_ARRAYS_HPP
#include "gt_geom.hpp"
#include "gt_pool.hpp"

/* Output positions (keys) per chunk of the dispatch path's work sharing
   (gt_pool.hpp): 256 KB of keys, tens of microseconds, so that waiting for a
   chunk a descheduled helper holds costs little. */
static const int64_t GT_CHUNK = (int64_t)1 << 16;
static inline int64_t gt_chunks(int64_t total, int nt) {
    return nt > 1 ? (total + GT_CHUNK - 1) / GT_CHUNK : 1;
}

#include <algorithm>
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#endif
struct GtIdKey { uint64_t id; uint32_t key; };

#include <vector>
#include <memory>
#include <cstring>
/* d[j] = s + j for j < m.  GCC's own vectorisation of this loop for
   baseline x86-64 ran at 0.77 ms for 3.1 M keys, this unrolled SSE2 at
   0.26 ms (one 16-byte store a cycle, no data read). */
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
static inline void gt_iota(uint32_t* d, int64_t m, uint32_t s) {
    int64_t j = 0;
    #if defined(__SSE2__)
    const __m128i k16 = _mm_set1_epi32(16);
    __m128i v0 = _mm_setr_epi32((int)s, (int)(s + 1), (int)(s + 2), (int)(s + 3));
    __m128i v1 = _mm_add_epi32(v0, _mm_set1_epi32(4));
    __m128i v2 = _mm_add_epi32(v0, _mm_set1_epi32(8));
    __m128i v3 = _mm_add_epi32(v0, _mm_set1_epi32(12));
    for (; j + 16 <= m; j += 16) {
        _mm_storeu_si128((__m128i*)(d + j), v0);
        _mm_storeu_si128((__m128i*)(d + j + 4), v1);
        _mm_storeu_si128((__m128i*)(d + j + 8), v2);
        _mm_storeu_si128((__m128i*)(d + j + 12), v3);
        v0 = _mm_add_epi32(v0, k16); v1 = _mm_add_epi32(v1, k16);
        v2 = _mm_add_epi32(v2, k16); v3 = _mm_add_epi32(v3, k16);
    }
    #endif
    for (; j < m; j++) d[j] = s + (uint32_t)j;
}

/* f(out_pos, row, len) for every piece of the runs, the output split
   evenly over nt threads by position.  Audiences mix a few runs of ~10^5
   rows with thousands of 1-3 rows, so splitting by run left one core with
   most of the bytes; this splits inside runs. */
template <class F> static void gt_for_runs(const int64_t* runs, const int64_t* offsets, int64_t k,
                                           int64_t total, int nt, F f) {
    int64_t nch = gt_chunks(total, nt);
    gt_par(nch, nt, [&](int64_t ch) {
        int64_t lo = total * ch / nch, hi = total * (ch + 1) / nch;
        if (lo < hi) {
            int64_t i = (int64_t)(std::upper_bound(offsets, offsets + k, lo) - offsets) - 1;
            for (; i < k && offsets[i] < hi; i++) {
                int64_t o = offsets[i], len = runs[2 * i + 1] - runs[2 * i];
                int64_t a = o > lo ? o : lo, b = o + len < hi ? o + len : hi;
                if (a < b) f(a, runs[2 * i] + (a - o), b - a);
            }
        }
    });
}
static void gt_fill_rows(const int64_t* runs, const int64_t* offsets, int64_t k, int64_t total,
                         int nt, uint32_t* out) {
    gt_for_runs(runs, offsets, k, total, nt, [=](int64_t o, int64_t row, int64_t len) {
        gt_iota(out + o, len, (uint32_t)row); });
}
static void gt_gather_runs_u32(const uint32_t* src, const int64_t* runs, const int64_t* offsets, int64_t k,
                               int64_t total, int nt, uint32_t* out) {
    gt_for_runs(runs, offsets, k, total, nt, [=](int64_t o, int64_t row, int64_t len) {
        std::copy(src + row, src + row + len, out + o); });
}
/* Materialise runs some of which are fresh runs (kept[i] < e - s: the rows
   r of [s, e) with seen[r] >= cut, see _kernels.Tree.query).  Plain runs are
   split by output position as in gt_for_runs; a fresh run (a few thousand
   rows at most) goes whole to the thread whose share of the output holds
   its first key, and is copied in one pass that reads the last-seen column
   beside the keys.  src NULL: the rows are the keys. */
static void gt_fill_fresh(const uint32_t* src, const int64_t* runs, const int64_t* kept,
                          const int64_t* offsets, int64_t k, int64_t total, const uint32_t* seen,
                          uint32_t cut, int nt, uint32_t* out) {
    int64_t nch = gt_chunks(total, nt);
    gt_par(nch, nt, [&](int64_t ch) {
        int64_t lo = total * ch / nch, hi = total * (ch + 1) / nch;
        if (lo < hi) {
            int64_t i = (int64_t)(std::upper_bound(offsets, offsets + k, lo) - offsets) - 1;
            if (i < 0) i = 0;
            for (; i < k && offsets[i] < hi; i++) {
                int64_t s = runs[2 * i], e = runs[2 * i + 1], o = offsets[i], len = e - s;
                if (kept[i] == len) {
                    int64_t a = o > lo ? o : lo, b = o + len < hi ? o + len : hi;
                    if (a >= b) continue;
                    if (src) std::copy(src + s + (a - o), src + s + (b - o), out + a);
                    else gt_iota(out + a, b - a, (uint32_t)(s + (a - o)));
                } else if (o >= lo) {
                    uint32_t* d = out + o;
                    int64_t m = 0, want = kept[i];
                    /* write every row, advance past the kept ones: no branch on the data */
                    for (int64_t r = s; r < e && m < want; r++) {
                        d[m] = src ? src[r] : (uint32_t)r;
                        m += seen[r] >= cut;
                    }
                }
            }
        }
    });
}

static inline void gt_set_bits(uint64_t* w, int64_t a, int64_t b) {   /* bits [a, b) */
    if (a >= b) return;
    int64_t wa = a >> 6, wb = (b - 1) >> 6;
    uint64_t ma = ~(uint64_t)0 << (a & 63), mb = ~(uint64_t)0 >> (63 - ((b - 1) & 63));
    if (wa == wb) { w[wa] |= ma & mb; return; }
    w[wa] |= ma;
    for (int64_t j = wa + 1; j < wb; j++) w[j] = ~(uint64_t)0;
    w[wb] |= mb;
}

/* A dense bitset of an audience's keys: the keys src[r] (src NULL: the row
   numbers) of every row of every run, fresh runs keeping rows with
   seen[r] >= cut (seen may be NULL when no run is fresh).  Each thread owns
   one stretch of words, so no two threads write a word.  With rows as keys
   the runs ascend in key order and each thread visits only its own; else
   every thread reads every key and keeps those in its stretch. */
static void gt_bitset_fresh(const uint32_t* src, const int64_t* runs, const int64_t* kept, int64_t k,
                            const uint32_t* seen, uint32_t cut, uint64_t* w, int64_t nw, int nt) {
    /* rows as keys: chunks of the key space.  Else one pass on the calling
       thread, branch-free: splitting the key space between threads made each
       test every key against its stretch, a mispredicted branch per key
       (20 M devices, 2.8 M keys from a chunked ingest: 30 ms on two threads). */
    int64_t nch = src ? 1 : gt_chunks(nw << 6, nt);
    gt_par(nch, nt, [&](int64_t ch) {
        int64_t lo = (nw * ch / nch) << 6, hi = (nw * (ch + 1) / nch) << 6;
        int64_t i = 0;
        if (!src) {   /* first run ending after lo */
            int64_t a = 0, b = k;
            while (a < b) { int64_t m = (a + b) / 2; if (runs[2 * m + 1] <= lo) a = m + 1; else b = m; }
            i = a;
        }
        for (; i < k; i++) {
            int64_t s = runs[2 * i], e = runs[2 * i + 1];
            bool plain = !kept || kept[i] == e - s;
            if (!src) {
                if (s >= hi) break;
                int64_t a = s > lo ? s : lo, b = e < hi ? e : hi;
                if (plain) { gt_set_bits(w, a, b); continue; }
                /* one word at a time in a register: OR-ing each bit into memory
                   chains every row to the store before it */
                for (int64_t r = a; r < b;) {
                    int64_t wi = r >> 6, end = (wi + 1) << 6 < b ? (wi + 1) << 6 : b;
                    if ((r & 63) == 0 && end - r == 64) { w[wi] |= gt_fresh_word(seen + r, cut); r = end; continue; }
                    uint64_t acc = 0;
                    for (; r < end; r++) acc |= (uint64_t)(seen[r] >= cut) << (r & 63);
                    w[wi] |= acc;
                }
                continue;
            }
            for (int64_t r = s; r < e; r++) {
                uint64_t key = src[r];
                bool ok = (int64_t)key < hi;            /* a damaged key never writes outside */
                uint64_t in = ok && (plain || seen[r] >= cut);
                key = ok ? key : 0;
                w[key >> 6] |= in << (key & 63);
            }
        }
    });
}

/* Plain runs (ascending, disjoint) of the rows a set of runs holds: fresh
   runs split where stale rows fall, touching plain runs merged.  Returns
   how many were written to out (room for at most total-kept + k runs). */
static int64_t gt_plain_runs(const int64_t* runs, const int64_t* kept, int64_t k, const uint32_t* seen,
                             uint32_t cut, int64_t* out) {
    int64_t m = 0;
    auto put = [&](int64_t a, int64_t b) {
        if (m && out[2 * m - 1] == a) out[2 * m - 1] = b;
        else { out[2 * m] = a; out[2 * m + 1] = b; m++; }
    };
    for (int64_t i = 0; i < k; i++) {
        int64_t s = runs[2 * i], e = runs[2 * i + 1];
        if (kept[i] == e - s) { put(s, e); continue; }
        int64_t open = -1;
        for (int64_t r = s; r < e; r++) {
            bool in = seen[r] >= cut;
            if (in && open < 0) open = r;
            else if (!in && open >= 0) { put(open, r); open = -1; }
        }
        if (open >= 0) put(open, e);
    }
    return m;
}

/* Per-chunk counts of each app code (nch rows of 256) become, in place, each chunk's first slot
   for each app, and `starts` (257) the apps' first slots: where a parallel scatter writes. */
static inline void gt_app_offsets(std::vector<int64_t>& counts, int64_t nch, int64_t* starts) {
    int64_t acc = 0;
    for (int a = 0; a < 256; a++) {
        starts[a] = acc;
        for (int64_t u = 0; u < nch; u++) {
            int64_t v = counts[(size_t)u * 256 + a]; counts[(size_t)u * 256 + a] = acc; acc += v; }
    }
    starts[256] = acc;
}

/* f(q, i) for every i of four contiguous quarters [b[q], b[q + 1]) of a
   range, the quarters interleaved: a scatter by app then has four chains of
   counter increments in flight instead of one (consecutive keys of the
   biggest app otherwise wait for each other's increment). */
template <class F> static inline void gt_quarters(const int64_t* b, F f) {
    int64_t m = b[1] - b[0];
    for (int q = 1; q < 4; q++) m = std::min(m, b[q + 1] - b[q]);
    for (int64_t i = 0; i < m; i++) { f(0, b[0] + i); f(1, b[1] + i); f(2, b[2] + i); f(3, b[3] + i); }
    for (int q = 0; q < 4; q++)
        for (int64_t i = b[q] + m; i < b[q + 1]; i++) f(q, i);
}

/* Group an audience's devices by partner app: a stable counting sort by
   app code over nt threads (each chunk counts its slice, then scatters it
   after the slices before it), carrying device id and key.  Linear, no sort by id;
   each app's devices keep the audience's order.  starts[c] .. starts[c + 1]
   is code c's stretch (codes are the int8 column read as unsigned). */
static void gt_group_by_app(const uint32_t* keys, int64_t n, const uint64_t* device_id, const int8_t* app,
                            uint64_t* out_ids, uint32_t* out_keys, int64_t* starts, int nt) {
    /* every chunk is four quarters, each with its own counts and slots */
    int64_t nch = gt_chunks(n, nt), nq = 4 * nch;
    std::vector<int64_t> counts((size_t)nq * 256, 0);
    auto quarters = [&](int64_t ch, int64_t* b) { for (int q = 0; q < 5; q++) b[q] = n * (4 * ch + q) / nq; };
    gt_par(nch, nt, [&](int64_t ch) {
        uint32_t h[4][256] = {};
        int64_t b[5];
        quarters(ch, b);
        gt_quarters(b, [&](int q, int64_t i) { h[q][(uint8_t)app[keys[i]]]++; });
        for (int q = 0; q < 4; q++) {
            int64_t* c = &counts[(size_t)(4 * ch + q) * 256];
            for (int a = 0; a < 256; a++) c[a] = h[q][a];
        }
    });
    gt_app_offsets(counts, nq, starts);
    gt_par(nch, nt, [&](int64_t ch) {
        int64_t b[5];
        quarters(ch, b);
        int64_t* c[4];
        for (int q = 0; q < 4; q++) c[q] = &counts[(size_t)(4 * ch + q) * 256];
        gt_quarters(b, [&](int q, int64_t i) {
            uint32_t k = keys[i];
            int64_t pos = c[q][(uint8_t)app[k]]++;
            out_keys[pos] = k;
            out_ids[pos] = device_id[k];
        });
    });
}

/* The pieces of an audience's runs that chunk ch of nch (an equal share of
   the output positions [0, total)) writes: f(out_pos, s, e, fresh) for rows
   [s, e), fresh when only the rows with seen[r] >= cut belong (a fresh run,
   see _kernels.Tree.query).  Plain runs are split by output position; a
   fresh run goes whole to the chunk whose share holds its first position,
   as in gt_fill_fresh.  kept NULL: every run is plain. */
template <class F> static inline void gt_chunk_pieces(const int64_t* runs, const int64_t* kept,
                                                      const int64_t* offsets, int64_t k, int64_t total,
                                                      int64_t nch, int64_t ch, F f) {
    int64_t lo = total * ch / nch, hi = total * (ch + 1) / nch;
    if (lo >= hi) return;
    int64_t i = (int64_t)(std::upper_bound(offsets, offsets + k, lo) - offsets) - 1;
    if (i < 0) i = 0;
    for (; i < k && offsets[i] < hi; i++) {
        int64_t s = runs[2 * i], e = runs[2 * i + 1], o = offsets[i], len = e - s;
        if (!kept || kept[i] == len) {
            int64_t a = o > lo ? o : lo, b = o + len < hi ? o + len : hi;
            if (a < b) f(a, s + (a - o), s + (b - o), false);
        } else if (o >= lo) {
            f(o, s, e, true);
        }
    }
}

/* Per-app counts of a piece's rows [s, e) (fr NULL: every row; else only the
   fresh ones), for codes below ncodes: one vector compare per code and 64
   rows, its mask ANDed with the freshness word, instead of one counter
   increment per row (about 2 loads and a store each).  Returns the rows it
   counted of any code, so a row whose code is ncodes or more shows as a
   shortfall in sum(h) and the caller counts the chunk again row by row.
   AVX-512BW or AVX2 is chosen at run time (gt_simd_level); both fall back to
   the rows themselves for a tail of fewer than 64. */
static inline int64_t gt_count_codes_tail(const uint8_t* app, int64_t r, int64_t e, const GtFresh* fr,
                                          int ncodes, uint32_t* h) {
    int64_t n = 0;
    for (; r < e; r++) {
        bool in = !fr || fr->row(r);
        n += in;
        if (in && app[r] < ncodes) h[app[r]]++;
    }
    return n;
}
#if GT_X86_SIMD
__attribute__((target("avx512bw,popcnt")))
static int64_t gt_count_codes_avx512(const uint8_t* app, int64_t s, int64_t e, const GtFresh* fr,
                                     int ncodes, uint32_t* h) {
    int64_t n = 0, r = s;
    for (; r + 64 <= e; r += 64) {
        uint64_t w = fr ? fr->word512(r) : ~(uint64_t)0;
        __m512i v = _mm512_loadu_si512((const void*)(app + r));
        n += __builtin_popcountll(w);
        for (int c = 0; c < ncodes; c++)
            h[c] += (uint32_t)__builtin_popcountll(
                _mm512_mask_cmpeq_epi8_mask((__mmask64)w, v, _mm512_set1_epi8((char)c)));
    }
    return n + gt_count_codes_tail(app, r, e, fr, ncodes, h);
}
__attribute__((target("avx2,popcnt")))
static int64_t gt_count_codes_avx2(const uint8_t* app, int64_t s, int64_t e, const GtFresh* fr,
                                   int ncodes, uint32_t* h) {
    int64_t n = 0, r = s;
    for (; r + 64 <= e; r += 64) {
        uint64_t w = fr ? fr->word(r) : ~(uint64_t)0;
        __m256i v0 = _mm256_loadu_si256((const __m256i*)(app + r));
        __m256i v1 = _mm256_loadu_si256((const __m256i*)(app + r + 32));
        n += __builtin_popcountll(w);
        for (int c = 0; c < ncodes; c++) {
            __m256i k = _mm256_set1_epi8((char)c);
            uint64_t m = (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(v0, k))
                       | (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(v1, k)) << 32;
            h[c] += (uint32_t)__builtin_popcountll(m & w);
        }
    }
    return n + gt_count_codes_tail(app, r, e, fr, ncodes, h);
}
#endif
static inline int64_t gt_count_codes(int level, const uint8_t* app, int64_t s, int64_t e, const GtFresh* fr,
                                     int ncodes, uint32_t* h) {
#if GT_X86_SIMD
    if (level >= 2) return gt_count_codes_avx512(app, s, e, fr, ncodes, h);
    if (level == 1) return gt_count_codes_avx2(app, s, e, fr, ncodes, h);
#endif
    (void)level;
    return gt_count_codes_tail(app, s, e, fr, ncodes, h);
}
/* Codes up to this many are counted by compares (gt_count_codes); a partner
   app list is about 25. */
static const int GT_COMPARE_CODES = 48;

/* Group a query result's devices by partner app straight from its runs: the
   app code and last-seen of each row are read from the index's leaf-ordered
   columns (sequential, 5 B a row) instead of the store's by key (random), and
   the keys are never written out first.  A stable counting sort over nt
   threads: every chunk of output positions counts its rows per app, then
   scatters id and key after the chunks before it.  Each app's devices keep
   the runs' order (index order), so the result equals gt_group_by_app of the
   keys fill() writes.  rows_keys NULL: the rows are the keys. */
static void gt_group_runs_by_app(const uint32_t* rows_keys, const int64_t* runs, const int64_t* kept,
                                 const int64_t* offsets, int64_t k, int64_t total, GtFresh fr,
                                 const int8_t* app_rows, const uint64_t* device_id,
                                 uint64_t* out_ids, uint32_t* out_keys, int64_t* starts, int nt, int ncodes) {
    int64_t nch = gt_chunks(total, nt);
    std::vector<int64_t> counts((size_t)nch * 256, 0);
    const int level = 0 < ncodes && ncodes <= GT_COMPARE_CODES ? gt_simd_level() : 0;
    gt_par(nch, nt, [&](int64_t ch) {
        if (level) {   /* by compares; a code of ncodes or more sends the chunk to the rows below */
            uint32_t hc[GT_COMPARE_CODES] = {};
            int64_t rows = 0, sum = 0;
            gt_chunk_pieces(runs, kept, offsets, k, total, nch, ch, [&](int64_t, int64_t s, int64_t e, bool fresh) {
                rows += gt_count_codes(level, (const uint8_t*)app_rows, s, e, fresh ? &fr : NULL, ncodes, hc);
            });
            for (int a = 0; a < ncodes; a++) sum += hc[a];
            if (sum == rows) {
                int64_t* c = &counts[(size_t)ch * 256];
                for (int a = 0; a < ncodes; a++) c[a] = hc[a];
                return;
            }
        }
        uint32_t h[4][256] = {};
        gt_chunk_pieces(runs, kept, offsets, k, total, nch, ch, [&](int64_t, int64_t s, int64_t e, bool fresh) {
            int64_t r = s;
            if (fresh) {   /* 64 rows' freshness a word; four counters, as below */
                for (; r + 64 <= e; r += 64) {
                    uint64_t w = fr.word(r);
                    const uint8_t* a = (const uint8_t*)app_rows + r;
                    for (int j = 0; j < 64; j += 4) {
                        h[0][a[j]] += (w >> j) & 1; h[1][a[j + 1]] += (w >> (j + 1)) & 1;
                        h[2][a[j + 2]] += (w >> (j + 2)) & 1; h[3][a[j + 3]] += (w >> (j + 3)) & 1;
                    }
                }
                for (; r < e; r++) h[r & 3][(uint8_t)app_rows[r]] += fr.row(r);
                return;
            }
            for (; r + 4 <= e; r += 4) {
                h[0][(uint8_t)app_rows[r]]++; h[1][(uint8_t)app_rows[r + 1]]++;
                h[2][(uint8_t)app_rows[r + 2]]++; h[3][(uint8_t)app_rows[r + 3]]++;
            }
            for (; r < e; r++) h[0][(uint8_t)app_rows[r]]++;
        });
        int64_t* c = &counts[(size_t)ch * 256];
        for (int a = 0; a < 256; a++) c[a] = (int64_t)h[0][a] + h[1][a] + h[2][a] + h[3][a];
    });
    gt_app_offsets(counts, nch, starts);
    /* Scatter in blocks of rows: the block's keys and codes, then its ids
       in one tight loop (many id misses in flight at once, and in index
       order, where neighbouring rows of one ingest batch share cache
       lines), then id and key into the app streams.  Gathering the ids
       after the scatter, in app order, read each id line once per app. */
    gt_par(nch, nt, [&](int64_t ch) {
        int64_t* c = &counts[(size_t)ch * 256];
        const int64_t B = 256;
        uint32_t kb[B]; uint8_t cb[B]; uint64_t ib[B];
        gt_chunk_pieces(runs, kept, offsets, k, total, nch, ch, [&](int64_t, int64_t s, int64_t e, bool fresh) {
            if (!rows_keys) {   /* rows are keys: the ids are read forward, no block needed */
                auto put = [&](int64_t r) {
                    int64_t pos = c[(uint8_t)app_rows[r]]++;
                    out_keys[pos] = (uint32_t)r;
                    out_ids[pos] = device_id[r];
                };
                int64_t r = s;
                if (fresh) {   /* 64 rows' freshness a word, then its set bits */
                    for (; r + 64 <= e; r += 64)
                        for (uint64_t w = fr.word(r); w; w &= w - 1) put(r + __builtin_ctzll(w));
                    for (; r < e; r++)
                        if (fr.row(r)) put(r);
                    return;
                }
                for (; r < e; r++) put(r);
                return;
            }
            for (int64_t b0 = s; b0 < e; b0 += B) {
                int64_t b1 = b0 + B < e ? b0 + B : e, m = 0;
                if (fresh) {   /* write every row, advance past the fresh ones: no branch on the data */
                    int64_t r = b0;
                    for (; r + 64 <= b1; r += 64) {
                        uint64_t w = fr.word(r);
                        for (int j = 0; j < 64; j++) {
                            kb[m] = rows_keys[r + j];
                            cb[m] = (uint8_t)app_rows[r + j];
                            m += (w >> j) & 1;
                        }
                    }
                    for (; r < b1; r++) {
                        kb[m] = rows_keys[r];
                        cb[m] = (uint8_t)app_rows[r];
                        m += fr.row(r);
                    }
                } else {
                    m = b1 - b0;
                    std::copy(rows_keys + b0, rows_keys + b1, kb);
                    std::copy((const uint8_t*)app_rows + b0, (const uint8_t*)app_rows + b1, cb);
                }
                for (int64_t j = 0; j < m; j++) ib[j] = device_id[kb[j]];
                for (int64_t j = 0; j < m; j++) {
                    int64_t pos = c[cb[j]]++;
                    out_keys[pos] = kb[j];
                    out_ids[pos] = ib[j];
                }
            }
        });
    });
}

/* f(key) for every key of one container of roaring's portable
   serialisation, ascending: kind 0 an array (card uint16), 1 a bitmap (1024
   words), 2 runs (uint16 count, then (start, length - 1) pairs). */
template <class F> static inline void gt_container_keys(const uint8_t* p, int64_t kind, int64_t card,
                                                        uint32_t base, F f) {
    if (kind == 0) {
        for (int64_t j = 0; j < card; j++) { uint16_t v; std::memcpy(&v, p + 2 * j, 2); f(base + v); }
    } else if (kind == 1) {
        for (int j = 0; j < 1024; j++) {
            uint64_t w; std::memcpy(&w, p + 8 * j, 8);
            for (; w; w &= w - 1) f(base + 64 * j + (uint32_t)__builtin_ctzll(w));
        }
    } else {
        uint16_t nr; std::memcpy(&nr, p, 2);
        for (int64_t j = 0; j < nr; j++) {
            uint16_t st, ln; std::memcpy(&st, p + 2 + 4 * j, 2); std::memcpy(&ln, p + 4 + 4 * j, 2);
            for (uint32_t v = st, e = (uint32_t)st + ln; v <= e; v++) f(base + v);
        }
    }
}

/* A roaring bitmap's devices grouped by app straight from its portable
   serialisation: no key array is written first (pyroaring's to_array
   allocates memory the kernel must fault in page by page, 0.5 ms a MB on
   this machine).  Containers are cut into chunks of about GT_CHUNK keys
   (chunk_at[c] .. chunk_at[c + 1]); each counts its keys per app, then
   scatters them, with their ids, after the chunks before it.  Each app's
   keys ascend.  The caller has checked
   every container (kind, card, pos[] its byte offset, base its high
   bits) and that every key indexes device_id and app. */
static void gt_group_bitmap_by_app(const uint8_t* buf, const int64_t* kind, const int64_t* card,
                                   const int64_t* pos, const uint32_t* base, const int64_t* chunk_at,
                                   int64_t nch, int64_t total, const uint64_t* device_id, const int8_t* app,
                                   uint64_t* out_ids, uint32_t* out_keys, int64_t* starts, int nt) {
    std::vector<int64_t> counts((size_t)nch * 256, 0);
    gt_par(nch, nt, [&](int64_t ch) {
        uint32_t h[256] = {};
        for (int64_t i = chunk_at[ch]; i < chunk_at[ch + 1]; i++)
            gt_container_keys(buf + pos[i], kind[i], card[i], base[i], [&](uint32_t key) { h[(uint8_t)app[key]]++; });
        int64_t* c = &counts[(size_t)ch * 256];
        for (int a = 0; a < 256; a++) c[a] = h[a];
    });
    gt_app_offsets(counts, nch, starts);
    /* keys ascend, so the ids are read in key order: a forward stream */
    gt_par(nch, nt, [&](int64_t ch) {
        int64_t* c = &counts[(size_t)ch * 256];
        for (int64_t i = chunk_at[ch]; i < chunk_at[ch + 1]; i++)
            gt_container_keys(buf + pos[i], kind[i], card[i], base[i], [&](uint32_t key) {
                int64_t at = c[(uint8_t)app[key]]++;
                out_keys[at] = key;
                out_ids[at] = device_id[key];
            });
    });
}

/* Sort ids carrying their row numbers.  One counting pass and one stable
   scatter into up to 2^16 buckets by the top bits of (id - min), then each
   bucket is sorted on its own, in cache, in parallel.  Device ids are
   hashes in practice, so buckets are small and even; a skewed id space
   only makes some buckets larger, never the result wrong. */
static void gt_sort_ids(const uint64_t* ids, int64_t n, uint64_t* out_ids, uint32_t* out_rows) {
    if (n == 0) return;
    uint64_t lo = ids[0], hi = ids[0];
    #pragma omp parallel for reduction(min:lo) reduction(max:hi)
    for (int64_t i = 0; i < n; i++) { if (ids[i] < lo) lo = ids[i]; if (ids[i] > hi) hi = ids[i]; }
    uint64_t span = hi - lo;
    int bits = span ? 64 - __builtin_clzll(span) : 0;
    int shift = bits > 16 ? bits - 16 : 0;
    int64_t nb = (int64_t)(span >> shift) + 1;
    int nt = 1;
    #ifdef _OPENMP
    nt = omp_get_max_threads();
    #endif
    std::vector<int64_t> counts((size_t)nt * nb, 0);
    /* new[] without () leaves the memory untouched: no serial zeroing pass */
    std::unique_ptr<GtIdKey[]> tmp(new GtIdKey[(size_t)n]);
    #pragma omp parallel num_threads(nt)
    {
        int t = 0;
        #ifdef _OPENMP
        t = omp_get_thread_num();
        #endif
        int64_t s = n * t / nt, e = n * (t + 1) / nt;
        int64_t* c = &counts[(size_t)t * nb];
        for (int64_t i = s; i < e; i++) c[(ids[i] - lo) >> shift]++;
        #pragma omp barrier
        #pragma omp single
        {
            int64_t acc = 0;
            for (int64_t b = 0; b < nb; b++)
                for (int u = 0; u < nt; u++) {
                    int64_t v = counts[(size_t)u * nb + b]; counts[(size_t)u * nb + b] = acc; acc += v; }
        }
        for (int64_t i = s; i < e; i++) {
            int64_t pos = c[(ids[i] - lo) >> shift]++;
            tmp[pos].id = ids[i]; tmp[pos].key = (uint32_t)i;
        }
    }
    /* after the scatter, counts[(nt-1)*nb + b] is the end of bucket b */
    #pragma omp parallel for schedule(dynamic, 64)
    for (int64_t b = 0; b < nb; b++) {
        int64_t e = counts[(size_t)(nt - 1) * nb + b];
        int64_t s = b ? counts[(size_t)(nt - 1) * nb + b - 1] : 0;
        if (e - s > 1)
            std::sort(tmp.get() + s, tmp.get() + e, [](const GtIdKey& a, const GtIdKey& b) {
                return a.id < b.id || (a.id == b.id && a.key < b.key); });
    }
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) { out_ids[i] = tmp[i].id; out_rows[i] = tmp[i].key; }
}

/* LSD radix sort of unsigned integers, 8-bit digits (4 passes for 32-bit
   keys, 8 for 64-bit ids) through one scratch buffer; a pass whose digit is
   the same for every element (the high bits of a local key range) is
   skipped.  One counting pass fills every digit's histogram.  256 buckets
   keep the scatter's open cache lines in L1: 11-bit digits took 86 ms for
   3.1 M ids against 49 ms; NumPy's sort took 178 ms on this machine. */
template <class T> static void gt_radix_sort(T* a, int64_t n, T* tmp) {
    const int BITS = 8, NB = 1 << BITS, PASSES = (int)(sizeof(T) * 8 + BITS - 1) / BITS;
    std::vector<int64_t> count((size_t)PASSES * NB, 0);
    for (int64_t i = 0; i < n; i++) {
        T v = a[i];
        for (int p = 0; p < PASSES; p++) count[(size_t)p * NB + ((v >> (p * BITS)) & (NB - 1))]++;
    }
    T* src = a; T* dst = tmp;
    for (int p = 0; p < PASSES; p++) {
        int64_t* c = &count[(size_t)p * NB];
        if (c[(src[0] >> (p * BITS)) & (NB - 1)] == n) continue;  /* one digit value: nothing moves */
        int64_t acc = 0;
        for (int b = 0; b < NB; b++) { int64_t v = c[b]; c[b] = acc; acc += v; }
        for (int64_t i = 0; i < n; i++) { T v = src[i]; dst[c[(v >> (p * BITS)) & (NB - 1)]++] = v; }
        T* t = src; src = dst; dst = t;
    }
    if (src != a) std::copy(src, src + n, a);
}

#include <cstring>
/* Roaring's portable serialisation (RoaringFormatSpec, with run containers)
   of a dense bitset of `words` 64-bit words.  Each container of 2^16 keys
   is written in the smallest form CRoaring's run_optimize would pick: runs
   when 2 + 4 runs is smaller than the array (2 per key, up to 4096 keys)
   or bitmap (8 KB) form.  Two passes over the bitset (sizes, then bytes),
   each over every core. */
static inline int64_t gt_word_runs(uint64_t x, uint64_t prev_top) {
    return __builtin_popcountll(x & ~((x << 1) | prev_top));
}
struct GtContainer { int64_t card, runs, bytes, kind; };   /* kind 0 array, 1 bitmap, 2 run */
static void gt_container_sizes(const uint64_t* w, int64_t nc, GtContainer* c, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt) if(nt > 1)
    for (int64_t i = 0; i < nc; i++) {
        const uint64_t* b = w + 1024 * i;
        int64_t card = 0, runs = 0; uint64_t top = 0;
        for (int j = 0; j < 1024; j++) {
            card += __builtin_popcountll(b[j]);
            runs += gt_word_runs(b[j], top);
            top = b[j] >> 63;
        }
        int64_t plain = card <= 4096 ? 2 * card : 8192, run = 2 + 4 * runs;
        c[i].card = card; c[i].runs = runs;
        c[i].kind = run < plain ? 2 : (card <= 4096 ? 0 : 1);
        c[i].bytes = card == 0 ? 0 : (run < plain ? run : plain);
    }
}
static inline void gt_put16(uint8_t* p, uint32_t v) { uint16_t u = (uint16_t)v; std::memcpy(p, &u, 2); }
static inline void gt_put32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
static void gt_container_write(const uint64_t* b, const GtContainer& c, uint8_t* out) {
    if (c.kind == 1) { std::memcpy(out, b, 8192); return; }
    if (c.kind == 0) {
        int64_t k = 0;
        for (int j = 0; j < 1024; j++)
            for (uint64_t x = b[j]; x; x &= x - 1) gt_put16(out + 2 * k++, 64 * j + __builtin_ctzll(x));
        return;
    }
    gt_put16(out, (uint32_t)c.runs);
    uint8_t* p = out + 2;
    int64_t start = -1;
    for (int j = 0; j < 1024; j++) {
        uint64_t x = b[j];
        if (start >= 0 && !(x & 1)) { gt_put16(p, start); gt_put16(p + 2, 64 * j - 1 - start); p += 4; start = -1; }
        while (x) {
            int t = __builtin_ctzll(x);
            if (start < 0) start = 64 * j + t;
            uint64_t inv = ~(x >> t);
            int ones = inv ? __builtin_ctzll(inv) : 64 - t;
            if (t + ones >= 64) break;                /* the run goes on into the next word */
            gt_put16(p, start); gt_put16(p + 2, 64 * j + t + ones - 1 - start); p += 4; start = -1;
            x &= ~((((uint64_t)1 << ones) - 1) << t);
        }
    }
    if (start >= 0) { gt_put16(p, start); gt_put16(p + 2, 65535 - start); }
}

#endif
