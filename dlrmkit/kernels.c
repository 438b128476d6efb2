/* CPU kernels for the trainer's hot paths, built on first use by dlrmkit/kernels.py.
 *
 * Plain C (no torch headers, so it builds in a fraction of a second), called through ctypes with
 * the tensors' data pointers; kernels.py checks the tensors' types and layouts and splits the work across
 * threads, and each kernel checks the bounds it walks (bags_in_bounds, stacked_rows_checked).
 * Built with -ffp-contract=off: each product is rounded before it is added, so the results equal
 * PyTorch's unfused operators bit for bit.
 */
#include <stdint.h>

#define PREFETCH_DISTANCE 16   /* ids ahead: enough to cover a DRAM access on the machines measured */
#define ROWS_PER_BLOCK_SHIFT 6 /* rows are dealt to the threads in blocks of 64 (no shared cache lines) */

static inline int owns_row(int64_t row, int64_t part, int64_t num_parts)
{
    return ((row >> ROWS_PER_BLOCK_SHIFT) % num_parts) == part;
}

/* Always inlined: GCC treats a separate function whose only effect is a prefetch as having no effect,
 * and may delete the calls to it. */
#if defined(__GNUC__) || defined(__clang__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

/* Prefetches, for writing, the row of the id PREFETCH_DISTANCE after position j (of the end ids)
 * when this part owns it: its cache lines arrive while the rows before it are updated. */
static ALWAYS_INLINE void prefetch_ahead(const char *weight, int64_t row_bytes, const int64_t *indices, int64_t j,
                                  int64_t end, int64_t part, int64_t num_parts)
{
    if (j + PREFETCH_DISTANCE >= end)
        return;
    const int64_t ahead = indices[j + PREFETCH_DISTANCE];
    if (owns_row(ahead, part, num_parts))
        for (int64_t byte = 0; byte < row_bytes; byte += 64)
            __builtin_prefetch(weight + ahead * row_bytes + byte, 1);
}

/* Whether bags and ids can be walked safely: 0 <= offsets[0] <= ... <= offsets[num_bags] <= num_indices
 * and every id they hold in [0, num_rows). */
int bags_in_bounds(const int64_t *restrict indices, int64_t num_indices, const int64_t *restrict offsets,
                   int64_t num_bags, int64_t num_rows)
{
    if (offsets[0] < 0 || offsets[num_bags] > num_indices)
        return 0;
    for (int64_t b = 0; b < num_bags; b++)
        if (offsets[b] > offsets[b + 1])
            return 0;
    int outside = 0;
    for (int64_t j = offsets[0]; j < offsets[num_bags]; j++)
        outside |= (uint64_t)indices[j] >= (uint64_t)num_rows; /* a negative id wraps past any limit */
    return !outside;
}

/* SGD on the rows a sum-pooled embedding bag looked up, straight from the gradient of its bags:
 *
 *     weight[indices[j]] += (grad[b] * index_weights[j]) * scale    for every id j of every bag b
 *
 * (without index_weights: grad[b] * scale), which is what embedding_bag's sparse backward, the
 * gradient times -lr, and a scatter-add into the weight compute, in the same order for a row
 * updated more than once (j ascending), without the [ids, dim] gradient in between.
 *
 * weight [rows, dim], grad [num_bags, dim] float32 contiguous; indices int64; offsets [num_bags + 1]
 * int64 (bag b holds indices[offsets[b] .. offsets[b + 1]]), both checked by bags_in_bounds first;
 * index_weights float32 per id or NULL. Only rows r with ((r >> 6) % num_parts) == part are written,
 * so num_parts threads with parts 0 .. num_parts - 1 never write the same row (or cache line).
 */
void bag_sgd_f32(float *restrict weight, int64_t dim, const int64_t *restrict indices,
                 const int64_t *restrict offsets, int64_t num_bags, const float *restrict grad,
                 const float *restrict index_weights, float scale, int64_t part, int64_t num_parts)
{
    const int64_t end = offsets[num_bags];
    for (int64_t b = 0; b < num_bags; b++) {
        const float *restrict g = grad + b * dim;
        for (int64_t j = offsets[b]; j < offsets[b + 1]; j++) {
            prefetch_ahead((const char *)weight, dim * (int64_t)sizeof(float), indices, j, end, part, num_parts);
            const int64_t r = indices[j];
            if (!owns_row(r, part, num_parts))
                continue;
            float *restrict w = weight + r * dim;
            if (index_weights) {
                const float iw = index_weights[j];
                for (int64_t d = 0; d < dim; d++) {
                    const float step = (g[d] * iw) * scale;
                    w[d] = w[d] + step;
                }
            } else {
                for (int64_t d = 0; d < dim; d++) {
                    const float step = g[d] * scale;
                    w[d] = w[d] + step;
                }
            }
        }
    }
}

/* bfloat16: the upper half of a float32's bits */
static inline float bf16_to_f32(uint16_t h)
{
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

/* float32 -> bfloat16, rounded stochastically: up with probability (the dropped low 16 bits) / 2^16,
 * so that the rounded value equals x on average; a value bfloat16 holds exactly is kept exactly.
 * Infinities and NaN are truncated (their low bits never carry into the exponent). Branch-free. */
static inline uint16_t f32_to_bf16_stochastic(float x, uint32_t random16)
{
    union { float f; uint32_t u; } v = { x };
    const uint32_t finite = (v.u & 0x7f800000u) != 0x7f800000u;
    return (uint16_t)((v.u + random16 * finite) >> 16);
}

static inline uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* 16 random bits for element d of a row whose update drew `base`: a 32-bit integer hash
 * (lowbias32) of base + d * golden ratio, independent across d, so the loop vectorises */
static inline uint32_t random16_of(uint32_t base, int64_t d)
{
    uint32_t x = base + (uint32_t)d * 0x9e3779b9u;
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x >> 16;
}

/* bag_sgd_f32 on a bfloat16 weight: each id's update computed in float32 as there, then the row stored
 * back rounded stochastically (f32_to_bf16_stochastic), with random bits that depend only on the seed,
 * the table, the id's position among its table's ids and d: the same whatever the number of threads, and
 * in a process holding some of the model's tables. The bags are bags_per_table per table, table t's
 * number in the model table_ids[t] (NULL: t). weight [rows, dim] bfloat16 (uint16_t); the rest as
 * bag_sgd_f32.
 */
void bag_sgd_bf16(uint16_t *restrict weight, int64_t dim, const int64_t *restrict indices,
                  const int64_t *restrict offsets, int64_t num_bags, const float *restrict grad,
                  const float *restrict index_weights, float scale, uint64_t seed, int64_t bags_per_table,
                  const int64_t *restrict table_ids, int64_t part, int64_t num_parts)
{
    const int64_t end = offsets[num_bags];
    const uint64_t mixed_seed = splitmix64(seed);
    for (int64_t b = 0; b < num_bags; b++) {
        const float *restrict g = grad + b * dim;
        const int64_t table = b / bags_per_table, table_start = offsets[table * bags_per_table];
        const uint64_t table_seed = splitmix64(mixed_seed ^ (uint64_t)(table_ids ? table_ids[table] : table));
        for (int64_t j = offsets[b]; j < offsets[b + 1]; j++) {
            prefetch_ahead((const char *)weight, dim * (int64_t)sizeof(uint16_t), indices, j, end, part, num_parts);
            const int64_t r = indices[j];
            if (!owns_row(r, part, num_parts))
                continue;
            uint16_t *restrict w = weight + r * dim;
            const uint32_t base = (uint32_t)splitmix64(table_seed + (uint64_t)(j - table_start));
            if (index_weights) {
                const float iw = index_weights[j];
                for (int64_t d = 0; d < dim; d++) {
                    const float step = (g[d] * iw) * scale;
                    w[d] = f32_to_bf16_stochastic(bf16_to_f32(w[d]) + step, random16_of(base, d));
                }
            } else {
                for (int64_t d = 0; d < dim; d++) {
                    const float step = g[d] * scale;
                    w[d] = f32_to_bf16_stochastic(bf16_to_f32(w[d]) + step, random16_of(base, d));
                }
            }
        }
    }
}

#ifdef _OPENMP
#include <omp.h>

/* bag_sgd_f32 and bag_sgd_bf16 on up to num_parts threads of OpenMP, each thread one part (the parts are
 * the team's actual size, so every row is written whatever size the runtime grants). Loaded into a process
 * whose PyTorch uses the same OpenMP runtime, these run on PyTorch's own worker threads, which are still
 * awake after its operators, instead of competing with them for the cores. */
void bag_sgd_f32_threads(float *restrict weight, int64_t dim, const int64_t *restrict indices,
                         const int64_t *restrict offsets, int64_t num_bags, const float *restrict grad,
                         const float *restrict index_weights, float scale, int64_t num_parts)
{
#pragma omp parallel num_threads((int)num_parts)
    bag_sgd_f32(weight, dim, indices, offsets, num_bags, grad, index_weights, scale, omp_get_thread_num(),
                omp_get_num_threads());
}

void bag_sgd_bf16_threads(uint16_t *restrict weight, int64_t dim, const int64_t *restrict indices,
                          const int64_t *restrict offsets, int64_t num_bags, const float *restrict grad,
                          const float *restrict index_weights, float scale, uint64_t seed, int64_t bags_per_table,
                          const int64_t *restrict table_ids, int64_t num_parts)
{
#pragma omp parallel num_threads((int)num_parts)
    bag_sgd_bf16(weight, dim, indices, offsets, num_bags, grad, index_weights, scale, seed, bags_per_table,
                 table_ids, omp_get_thread_num(), omp_get_num_threads());
}

/* The address of the OpenMP runtime's omp_get_num_threads these kernels call: kernels.py checks that it
 * lies in PyTorch's runtime. */
void *openmp_runtime_symbol(void)
{
    return (void *)&omp_get_num_threads;
}
#endif

/* Each id's row in a stack of tables, checked: rows[j] = indices[j] + first_row[t] for the ids j of
 * table t, which are indices[offsets[t * batch] .. offsets[(t + 1) * batch]) (SparseFeatures' layout;
 * offsets has num_tables * batch + 1 entries). Returns -1 when every id lies in [0, table_rows[t]) of
 * its table, -2 when the tables do not cover indices[0 .. num_indices) in order (malformed offsets), else
 * the position of the first id outside its table (rows then incomplete). All int64; one pass.
 */
int64_t stacked_rows_checked(const int64_t *restrict indices, int64_t num_indices, const int64_t *restrict offsets,
                             int64_t batch, int64_t num_tables, const int64_t *restrict first_row,
                             const int64_t *restrict table_rows, int64_t *restrict rows)
{
    if (offsets[0] != 0 || offsets[num_tables * batch] != num_indices)
        return -2;
    for (int64_t t = 0; t < num_tables; t++)
        if (offsets[t * batch] > offsets[(t + 1) * batch])
            return -2;
    for (int64_t t = 0; t < num_tables; t++) {
        const int64_t start = offsets[t * batch], end = offsets[(t + 1) * batch];
        const int64_t shift = first_row[t];
        const uint64_t limit = (uint64_t)table_rows[t];
        int outside = 0;
        for (int64_t j = start; j < end; j++) {
            outside |= (uint64_t)indices[j] >= limit; /* a negative id wraps past any limit */
            rows[j] = indices[j] + shift;
        }
        if (outside)
            for (int64_t j = start; j < end; j++)
                if ((uint64_t)indices[j] >= limit)
                    return j;
    }
    return -1;
}
