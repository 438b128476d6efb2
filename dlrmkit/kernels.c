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

/* float32 -> bfloat16 rounded to nearest, ties to even, as PyTorch converts finite values and infinities (NaN:
 * the quiet NaN 0x7fc0, as PyTorch's scalar conversion; its vectorised one writes another NaN) */
static inline uint16_t f32_to_bf16_nearest(float x)
{
    union { float f; uint32_t u; } v = { x };
    const uint16_t rounded = (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
    return x != x ? (uint16_t)0x7fc0u : rounded;
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

/* Adagrad (element-wise, as torch.optim.Adagrad) on the rows that sum-pooled bags looked up, straight from
 * the gradient of the bags: for each distinct row r, with g its gradient (the sum over its ids j of
 * grad[bag of j] * index_weights[j]),
 *
 *     state[r] += g * g,    weight[r] += (g / (sqrt(state[r]) + eps)) * neg_lr
 *
 * which is what embedding_bag's sparse backward, the coalescing of its rows (dlrmkit.optim.coalesce_rows) and
 * Adagrad's sparse step compute, operation by operation (the square root correctly rounded), without the
 * [ids, dim] gradient in between. The ids are given grouped by row: segment s holds positions
 * order[starts[s] .. starts[s + 1]) (ascending, as the coalescing sums them) of the ids of row rows[s];
 * bag_of[j] is the bag of id j.
 * weight, state [R, dim], grad [bags, dim] float32 contiguous; rows ascending and distinct, so the parts (equal
 * ranges of segments) never write the same row (kernels.py checks that and every index's bounds).
 */
void adagrad_bag_rows_f32(float *restrict weight, float *restrict state, int64_t dim, const int64_t *restrict rows,
                          const int64_t *restrict starts, int64_t num_segments, const int64_t *restrict order,
                          const int64_t *restrict bag_of, const float *restrict grad,
                          const float *restrict index_weights, float neg_lr, float eps, int64_t part,
                          int64_t num_parts)
{
    float g[dim];
    const int64_t first = num_segments * part / num_parts, last = num_segments * (part + 1) / num_parts;
    const int64_t ids_end = starts[last];
    for (int64_t s = first; s < last; s++) {
        if (s + 1 < last)
            for (int64_t byte = 0; byte < dim * (int64_t)sizeof(float); byte += 64) {
                __builtin_prefetch((const char *)(weight + rows[s + 1] * dim) + byte, 1);
                __builtin_prefetch((const char *)(state + rows[s + 1] * dim) + byte, 1);
            }
        for (int64_t d = 0; d < dim; d++)
            g[d] = 0.0f;
        for (int64_t k = starts[s]; k < starts[s + 1]; k++) {
            if (k + PREFETCH_DISTANCE < ids_end) /* the bags' gradients come in no order: fetch ahead */
                for (int64_t byte = 0; byte < dim * (int64_t)sizeof(float); byte += 64)
                    __builtin_prefetch((const char *)(grad + bag_of[order[k + PREFETCH_DISTANCE]] * dim) + byte, 0);
            const int64_t j = order[k];
            const float *restrict bag_grad = grad + bag_of[j] * dim;
            if (index_weights) {
                const float iw = index_weights[j];
                for (int64_t d = 0; d < dim; d++)
                    g[d] = g[d] + bag_grad[d] * iw;
            } else {
                for (int64_t d = 0; d < dim; d++)
                    g[d] = g[d] + bag_grad[d];
            }
        }
        float *restrict w = weight + rows[s] * dim, *restrict sum = state + rows[s] * dim;
        for (int64_t d = 0; d < dim; d++) {
            sum[d] = sum[d] + g[d] * g[d];
            const float std = __builtin_sqrtf(sum[d]) + eps;
            w[d] = w[d] + (g[d] / std) * neg_lr;
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

void adagrad_bag_rows_f32_threads(float *weight, float *state, int64_t dim, const int64_t *rows, const int64_t *starts,
                                  int64_t num_segments, const int64_t *order, const int64_t *bag_of, const float *grad,
                                  const float *index_weights, float neg_lr, float eps, int64_t num_parts)
{
#pragma omp parallel num_threads((int)num_parts)
    adagrad_bag_rows_f32(weight, state, dim, rows, starts, num_segments, order, bag_of, grad, index_weights, neg_lr,
                         eps, omp_get_thread_num(), omp_get_num_threads());
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

/* The dot interaction (Naumov et al. 2019, arXiv:1906.00091) of one sample range: for each sample b, its
 * F = num_tables + 1 feature vectors f_0 = x[b], f_t = ly[b, t - 1] (dim floats each), and its output row
 *
 *     out[b] = [f_0, f_1 . f_0, f_2 . f_0, f_2 . f_1, ..., f_T . f_{T-1}]    (pairs i > j in row-major order;
 *                                                                             i >= j when itself)
 *
 * each dot product summed over d = 0 .. dim - 1 in order in float32 (the same whatever the threads).
 * x [batch, dim] with row stride x_stride; ly [batch, num_tables, dim] with strides ly_sb, ly_st (the
 * last dimension contiguous); out [batch, dim + pairs] contiguous; all float32. A sample's features are
 * copied transposed into `scratch` ([dim][F rounded up to LANES], the padding zero) so that the products
 * of f_i with f_0 .. f_{i-1} are LANES-wide vector operations, ROWS rows i at a time. Always inlined into
 * callers with a constant dim (the usual widths), whose loops over d then compile to straight vector code.
 */
#define LANES 16
#define ROWS 4 /* rows of products computed together (the a0 .. a3 below) */

static inline int64_t lanes_up(int64_t n)
{
    return (n + LANES - 1) / LANES * LANES;
}

static ALWAYS_INLINE const float *feature_row(const float *x, int64_t x_stride, const float *ly, int64_t ly_sb,
                                              int64_t ly_st, int64_t b, int64_t i)
{
    return i == 0 ? x + b * x_stride : ly + b * ly_sb + (i - 1) * ly_st;
}

/* Width of the dot interaction's output row: dim, then one product per pair of the F features (i > j, or i >= j
 * with itself) */
static inline int64_t interaction_width(int64_t F, int64_t dim, int itself)
{
    return dim + (itself ? F * (F + 1) / 2 : F * (F - 1) / 2);
}

static ALWAYS_INLINE void dot_interaction_range(const float *restrict x, int64_t x_stride, const float *restrict ly,
                                                int64_t ly_sb, int64_t ly_st, int64_t num_tables, const int64_t dim,
                                                int itself, void *restrict out, int out_bf16,
                                                float *restrict scratch, int64_t begin, int64_t end)
{
    const int64_t F = num_tables + 1, padded = lanes_up(F);
    const int64_t width = interaction_width(F, dim, itself);
    float *restrict ft = scratch, *restrict acc = scratch + dim * padded, *restrict row = acc + ROWS * padded;
    for (int64_t k = 0; k < dim * padded; k++)
        ft[k] = 0.0f;
    for (int64_t b = begin; b < end; b++) {
        float *restrict o = out_bf16 ? row : (float *)out + b * width;
        for (int64_t i = 0; i < F; i++) {
            const float *restrict f = feature_row(x, x_stride, ly, ly_sb, ly_st, b, i);
            for (int64_t d = 0; d < dim; d++)
                ft[d * padded + i] = f[d];
        }
        for (int64_t d = 0; d < dim; d++)
            o[d] = x[b * x_stride + d];
        float *restrict pair = o + dim;
        for (int64_t i0 = 0; i0 < F; i0 += ROWS) {
            /* the products of rows i0 .. i0 + ROWS - 1 with every f_j they pair with (rows past F: the zero
             * columns of ft), sharing each load of f_j */
            const int64_t last = i0 + ROWS - 1, blocks = lanes_up(itself ? last + 1 : last);
            for (int64_t j0 = 0; j0 < blocks; j0 += LANES) {
                float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};
                for (int64_t d = 0; d < dim; d++) {
                    const float *restrict fj = ft + d * padded + j0, *restrict fi = ft + d * padded + i0;
                    for (int64_t l = 0; l < LANES; l++) {
                        a0[l] = a0[l] + fi[0] * fj[l];
                        a1[l] = a1[l] + fi[1] * fj[l];
                        a2[l] = a2[l] + fi[2] * fj[l];
                        a3[l] = a3[l] + fi[3] * fj[l];
                    }
                }
                for (int64_t l = 0; l < LANES; l++) {
                    acc[0 * padded + j0 + l] = a0[l];
                    acc[1 * padded + j0 + l] = a1[l];
                    acc[2 * padded + j0 + l] = a2[l];
                    acc[3 * padded + j0 + l] = a3[l];
                }
            }
            for (int64_t k = 0; k < ROWS && i0 + k < F; k++) {
                const int64_t n = itself ? i0 + k + 1 : i0 + k;
                for (int64_t j = 0; j < n; j++)
                    pair[j] = acc[k * padded + j];
                pair += n;
            }
        }
        if (out_bf16)
            for (int64_t k = 0; k < width; k++)
                ((uint16_t *)out)[b * width + k] = f32_to_bf16_nearest(row[k]);
    }
}

/* The gradient of dot_interaction_range: with g the pairs' part of grad_out[b] and S the symmetric
 * [F, F] matrix holding g at (i, j) and (j, i) (2 g at a self-pair (i, i), as d(f.f)/df = 2f),
 *
 *     grad_x[b] = grad_out[b, :dim] + sum_j S[0, j] f_j,    grad_ly[b, t] = sum_j S[t + 1, j] f_j
 *
 * each sum over j = 0 .. F - 1 in order in float32, the zeros S[i, i] without itself included (as in
 * S @ features), ROWS rows i at a time. grad_out [batch, dim + pairs] with row stride grad_stride; grad_x
 * [batch, dim] contiguous; grad_ly with strides gly_sb, gly_st (the last dimension contiguous); `scratch`
 * (F rounded up to ROWS) * F + F * dim + (a bfloat16 grad_out's row) floats.
 */
static ALWAYS_INLINE void dot_interaction_backward_range(
    const float *restrict x, int64_t x_stride, const float *restrict ly, int64_t ly_sb, int64_t ly_st,
    int64_t num_tables, const int64_t dim, int itself, const void *restrict grad_out, int grad_bf16,
    int64_t grad_stride, float *restrict grad_x, float *restrict grad_ly, int64_t gly_sb, int64_t gly_st,
    float *restrict scratch, int64_t begin, int64_t end)
{
    const int64_t F = num_tables + 1, rows = (F + ROWS - 1) / ROWS * ROWS;
    const int64_t width = interaction_width(F, dim, itself);
    float *restrict S = scratch, *restrict f = scratch + rows * F, *restrict widened = f + F * dim;
    for (int64_t k = F * F; k < rows * F; k++) /* the rows past F: zero, never written */
        S[k] = 0.0f;
    for (int64_t b = begin; b < end; b++) {
        const float *restrict direct = (const float *)grad_out + b * grad_stride;
        if (grad_bf16) {
            const uint16_t *restrict h = (const uint16_t *)grad_out + b * grad_stride;
            for (int64_t k = 0; k < width; k++)
                widened[k] = bf16_to_f32(h[k]);
            direct = widened;
        }
        const float *restrict g = direct + dim;
        for (int64_t i = 0, p = 0; i < F; i++) {
            for (int64_t j = 0; j < i; j++, p++)
                S[i * F + j] = S[j * F + i] = g[p];
            S[i * F + i] = itself ? 2.0f * g[p++] : 0.0f;
        }
        for (int64_t i = 0; i < F; i++) {
            const float *restrict row = feature_row(x, x_stride, ly, ly_sb, ly_st, b, i);
            for (int64_t d = 0; d < dim; d++)
                f[i * dim + d] = row[d];
        }
        for (int64_t i0 = 0; i0 < F; i0 += ROWS) {
            float a0[dim], a1[dim], a2[dim], a3[dim]; /* registers when dim is a constant */
            for (int64_t d = 0; d < dim; d++)
                a0[d] = a1[d] = a2[d] = a3[d] = 0.0f;
            for (int64_t j = 0; j < F; j++) {
                const float *restrict fj = f + j * dim, *restrict s = S + i0 * F + j;
                for (int64_t d = 0; d < dim; d++) {
                    a0[d] = a0[d] + s[0 * F] * fj[d];
                    a1[d] = a1[d] + s[1 * F] * fj[d];
                    a2[d] = a2[d] + s[2 * F] * fj[d];
                    a3[d] = a3[d] + s[3 * F] * fj[d];
                }
            }
            for (int64_t k = 0; k < ROWS && i0 + k < F; k++) {
                const int64_t i = i0 + k;
                const float *a = k == 0 ? a0 : k == 1 ? a1 : k == 2 ? a2 : a3;
                if (i == 0) {
                    for (int64_t d = 0; d < dim; d++)
                        grad_x[b * dim + d] = direct[d] + a[d];
                } else {
                    float *restrict dst = grad_ly + b * gly_sb + (i - 1) * gly_st;
                    for (int64_t d = 0; d < dim; d++)
                        dst[d] = a[d];
                }
            }
        }
    }
}

/* Sample range of `part` of num_parts (contiguous, as even as can be). */
static void part_range(int64_t batch, int64_t part, int64_t num_parts, int64_t *begin, int64_t *end)
{
    *begin = batch * part / num_parts;
    *end = batch * (part + 1) / num_parts;
}

/* The entry points: part `part` of num_parts, each part using its own dot_interaction_scratch_floats(num_tables,
 * dim) floats of `scratch` (num_parts times as many). */
int64_t dot_interaction_scratch_floats(int64_t num_tables, int64_t dim)
{
    const int64_t F = num_tables + 1, row = interaction_width(F, dim, 1); /* a bfloat16 row as float32 */
    const int64_t forward = (dim + ROWS) * lanes_up(F) + row;
    const int64_t backward = (F + ROWS - 1) / ROWS * ROWS * F + F * dim + row;
    return forward > backward ? forward : backward;
}

/* The range functions with dim a constant for the embedding widths of the Kaggle, benchmark and Terabyte models
 * (each constant adds about 0.2 s to the build), else a variable. */
#define WITH_CONSTANT_DIM(dim, call)                                                                          \
    switch (dim) {                                                                                              \
    case 16: { const int64_t d_ = 16; call; break; }                                                            \
    case 64: { const int64_t d_ = 64; call; break; }                                                            \
    case 128: { const int64_t d_ = 128; call; break; }                                                          \
    default: { const int64_t d_ = dim; call; break; }                                                           \
    }

/* out_bf16: out is bfloat16 (uint16_t), each float32 result rounded to nearest (f32_to_bf16_nearest);
 * grad_bf16: grad_out is bfloat16, widened exactly (grad_stride in its elements either way) */
void dot_interaction_f32(const float *x, int64_t x_stride, const float *ly, int64_t ly_sb, int64_t ly_st,
                         int64_t batch, int64_t num_tables, int64_t dim, int itself, void *out, int out_bf16,
                         float *scratch, int64_t part, int64_t num_parts)
{
    int64_t begin, end;
    part_range(batch, part, num_parts, &begin, &end);
    scratch += part * dot_interaction_scratch_floats(num_tables, dim);
    WITH_CONSTANT_DIM(dim, dot_interaction_range(x, x_stride, ly, ly_sb, ly_st, num_tables, d_, itself, out, out_bf16,
                                                 scratch, begin, end))
}

void dot_interaction_backward_f32(const float *x, int64_t x_stride, const float *ly, int64_t ly_sb, int64_t ly_st,
                                  int64_t batch, int64_t num_tables, int64_t dim, int itself, const void *grad_out,
                                  int grad_bf16, int64_t grad_stride, float *grad_x, float *grad_ly, int64_t gly_sb,
                                  int64_t gly_st, float *scratch, int64_t part, int64_t num_parts)
{
    int64_t begin, end;
    part_range(batch, part, num_parts, &begin, &end);
    scratch += part * dot_interaction_scratch_floats(num_tables, dim);
    WITH_CONSTANT_DIM(dim, dot_interaction_backward_range(x, x_stride, ly, ly_sb, ly_st, num_tables, d_, itself,
                                                          grad_out, grad_bf16, grad_stride, grad_x, grad_ly, gly_sb,
                                                          gly_st, scratch, begin, end))
}

#ifdef _OPENMP
/* dot_interaction_f32 and its backward on up to num_parts of PyTorch's OpenMP threads (see
 * bag_sgd_f32_threads). */
void dot_interaction_f32_threads(const float *x, int64_t x_stride, const float *ly, int64_t ly_sb, int64_t ly_st,
                                 int64_t batch, int64_t num_tables, int64_t dim, int itself, void *out, int out_bf16,
                                 float *scratch, int64_t num_parts)
{
#pragma omp parallel num_threads((int)num_parts)
    dot_interaction_f32(x, x_stride, ly, ly_sb, ly_st, batch, num_tables, dim, itself, out, out_bf16, scratch,
                        omp_get_thread_num(), omp_get_num_threads());
}

void dot_interaction_backward_f32_threads(const float *x, int64_t x_stride, const float *ly, int64_t ly_sb,
                                          int64_t ly_st, int64_t batch, int64_t num_tables, int64_t dim, int itself,
                                          const void *grad_out, int grad_bf16, int64_t grad_stride, float *grad_x,
                                          float *grad_ly, int64_t gly_sb, int64_t gly_st, float *scratch,
                                          int64_t num_parts)
{
#pragma omp parallel num_threads((int)num_parts)
    dot_interaction_backward_f32(x, x_stride, ly, ly_sb, ly_st, batch, num_tables, dim, itself, grad_out, grad_bf16,
                                 grad_stride, grad_x, grad_ly, gly_sb, gly_st, scratch, omp_get_thread_num(),
                                 omp_get_num_threads());
}
#endif

/* Random bags (dlrm_data.RandomDataset) laid out for sorting and made unique after it, for int32 and int64 ids:
 *
 * pad_bags: bags [n, width] <- the n bags of `ids` (bag b: sizes[b] consecutive ids), each row filled up with
 *   `pad` (above every id, so a sorted row holds its ids first).
 * distinct_sorted_bags: bags [n, width], each row sorted; writes each row's distinct values below `rows` to
 *   out (int64, in order) and their number to lengths[b]; returns how many were written.
 */
#define RANDOM_BAG_KERNELS(T, suffix)                                                                           \
    void pad_bags_##suffix(const T *restrict ids, const int64_t *restrict sizes, int64_t n, int64_t width, T pad, \
                           T *restrict bags)                                                                    \
    {                                                                                                           \
        for (int64_t b = 0; b < n; b++) {                                                                       \
            T *restrict row = bags + b * width;                                                                 \
            for (int64_t j = 0; j < sizes[b]; j++)                                                              \
                row[j] = *ids++;                                                                                \
            for (int64_t j = sizes[b]; j < width; j++)                                                          \
                row[j] = pad;                                                                                   \
        }                                                                                                       \
    }                                                                                                           \
                                                                                                                \
    int64_t distinct_sorted_bags_##suffix(const T *restrict bags, int64_t n, int64_t width, int64_t rows,        \
                                         int64_t *restrict lengths, int64_t *restrict out)                     \
    {                                                                                                           \
        int64_t written = 0;                                                                                    \
        for (int64_t b = 0; b < n; b++) {                                                                       \
            const T *restrict row = bags + b * width;                                                           \
            const int64_t first = written;                                                                      \
            for (int64_t j = 0; j < width && row[j] < rows; j++) {                                             \
                out[written] = row[j];                                                                          \
                written += j == 0 || row[j] != row[j - 1];                                                      \
            }                                                                                                   \
            lengths[b] = written - first;                                                                       \
        }                                                                                                       \
        return written;                                                                                         \
    }

RANDOM_BAG_KERNELS(int32_t, i32)
RANDOM_BAG_KERNELS(int64_t, i64)

/* 32 random bits x to a float32 in [0, 1): (x >> 8) * 2^-24, 24 random bits, exact (NumPy's float32 draws; the
 * tables' initial values) */
static ALWAYS_INLINE float unit_f32(uint32_t x)
{
    return (float)(x >> 8) * 0x1p-24f;
}

/* NumPy's PCG64 (O'Neill, "PCG: a family of simple fast space-efficient statistically good algorithms for random
 * number generation", 2014; XSL RR 128/64 as numpy.random.PCG64): the 128-bit state advances by
 * state = state * PCG64_MULTIPLIER + inc, then the new state gives a 64-bit word. The kernels below draw what
 * NumPy's Generator.random draws from a state, word for word, so that a thread can start anywhere in a stream
 * (pcg64_jump) and random batches come out the same as NumPy's, on any number of threads. Built only where the
 * compiler has 128-bit integers (kernels.py checks). */
#if defined(__SIZEOF_INT128__)
typedef unsigned __int128 pcg128_t;
#define PCG64_MULTIPLIER (((pcg128_t)0x2360ed051fc65da4ull << 64) | 0x4385df649fccf645ull)

static inline pcg128_t pcg128(uint64_t hi, uint64_t lo)
{
    return ((pcg128_t)hi << 64) | lo;
}

static inline uint64_t pcg64_next(pcg128_t *state, pcg128_t inc)
{
    *state = *state * PCG64_MULTIPLIER + inc;
    const uint64_t x = (uint64_t)(*state >> 64) ^ (uint64_t)*state;
    const unsigned rotation = (unsigned)(*state >> 122);
    return (x >> rotation) | (x << ((-rotation) & 63u));
}

/* The state `delta` steps after `state` (Brown, "Random number generation with arbitrary strides", 1994) */
static pcg128_t pcg64_jump(pcg128_t state, pcg128_t inc, uint64_t delta)
{
    pcg128_t multiplier = PCG64_MULTIPLIER, increment = inc, total_multiplier = 1, total_increment = 0;
    for (; delta; delta >>= 1) {
        if (delta & 1) {
            total_multiplier *= multiplier;
            total_increment = total_increment * multiplier + increment;
        }
        increment = (multiplier + 1) * increment;
        multiplier *= multiplier;
    }
    return total_multiplier * state + total_increment;
}

static ALWAYS_INLINE void store_f32_pair(float *out, int64_t count, int64_t w, uint64_t word)
{
    out[2 * w] = unit_f32((uint32_t)word);
    if (2 * w + 1 < count)
        out[2 * w + 1] = unit_f32((uint32_t)(word >> 32));
}

/* out[e] for e in part `part` of num_parts parts of [0, count): Generator.random(count, dtype=float32) from a
 * state with no half word buffered: value e is (x >> 8) * 2^-24 for x the low (e even) or high (e odd) 32 bits
 * of word e / 2. A part's words are drawn as two streams in step (its two halves): each word waits for the
 * multiplication before it, so two independent ones keep the multiplier busy. */
void pcg64_random_f32(float *restrict out, int64_t count, uint64_t state_hi, uint64_t state_lo, uint64_t inc_hi,
                      uint64_t inc_lo, int64_t part, int64_t num_parts)
{
    const int64_t words = (count + 1) / 2, first = words * part / num_parts, last = words * (part + 1) / num_parts;
    const int64_t middle = first + (last - first + 1) / 2; /* halves [first, middle) and [middle, last) */
    const pcg128_t inc = pcg128(inc_hi, inc_lo), start = pcg128(state_hi, state_lo);
    pcg128_t front = pcg64_jump(start, inc, (uint64_t)first), back = pcg64_jump(start, inc, (uint64_t)middle);
    for (int64_t w = middle; w < last; w++) {
        store_f32_pair(out, count, w - (middle - first), pcg64_next(&front, inc));
        store_f32_pair(out, count, w, pcg64_next(&back, inc));
    }
    if (middle - first > last - middle) /* the front half's one more word */
        store_f32_pair(out, count, middle - 1, pcg64_next(&front, inc));
}

/* Table t's stream at bag b's first id (the states and starts of uniform_bags below) */
static inline pcg128_t bag_stream(const uint64_t *states, const int64_t *starts, int64_t bags_per_table, int64_t b,
                                  pcg128_t inc)
{
    const int64_t t = b / bags_per_table;
    return pcg64_jump(pcg128(states[2 * t], states[2 * t + 1]), inc,
                      (uint64_t)(starts[b] - starts[t * bags_per_table]));
}

static ALWAYS_INLINE double uniform_draw(pcg128_t *state, pcg128_t inc)
{
    return (double)(pcg64_next(state, inc) >> 11) * 0x1p-53;
}

/* Uniform ids of random bags, drawn as dlrm_data.RandomDataset draws them with NumPy, into rows of bags
 * [num_bags, width] filled up with `pad`: bag b (of table t = b / bags_per_table) holds sizes[b] ids, each
 * rint(u * (rows[t] - 1)) for u = Generator.random()'s next double, (word >> 11) * 2^-53, word
 * starts[b] - starts[t * bags_per_table] of the stream that starts at table t's state (states[2t] high and
 * states[2t + 1] low 64 bits). starts: [num_bags] first id of each bag in the batch (sizes summed). For the bags
 * of part `part` of num_parts parts (one stream: unlike pcg64_random_f32's, this loop is not bound by the
 * multiplications, and two streams in step were no faster). */
#define UNIFORM_BAGS_KERNEL(T, suffix)                                                                          \
    void uniform_bags_##suffix(T *restrict bags, int64_t width, T pad, const int64_t *restrict sizes,              \
                               const int64_t *restrict starts, int64_t num_bags, int64_t bags_per_table,          \
                               const uint64_t *restrict states, const int64_t *restrict rows, uint64_t inc_hi,    \
                               uint64_t inc_lo, int64_t part, int64_t num_parts)                                  \
    {                                                                                                           \
        const pcg128_t inc = pcg128(inc_hi, inc_lo);                                                            \
        const int64_t first = num_bags * part / num_parts, last = num_bags * (part + 1) / num_parts;            \
        pcg128_t state = 0;                                                                                     \
        for (int64_t b = first; b < last; b++) {                                                                \
            if (b == first || b % bags_per_table == 0) /* this table's stream, at this bag's first id */        \
                state = bag_stream(states, starts, bags_per_table, b, inc);                                     \
            const double scale = (double)(rows[b / bags_per_table] - 1);                                        \
            T *restrict row = bags + b * width;                                                                 \
            for (int64_t j = 0; j < sizes[b]; j++)                                                              \
                row[j] = (T)__builtin_rint(uniform_draw(&state, inc) * scale);                                  \
            for (int64_t j = sizes[b]; j < width; j++)                                                          \
                row[j] = pad;                                                                                   \
        }                                                                                                       \
    }

UNIFORM_BAGS_KERNEL(int32_t, i32)
UNIFORM_BAGS_KERNEL(int64_t, i64)

#ifdef _OPENMP
void pcg64_random_f32_threads(float *out, int64_t count, uint64_t state_hi, uint64_t state_lo, uint64_t inc_hi,
                              uint64_t inc_lo, int64_t num_parts)
{
#pragma omp parallel num_threads((int)num_parts)
    pcg64_random_f32(out, count, state_hi, state_lo, inc_hi, inc_lo, omp_get_thread_num(), omp_get_num_threads());
}

#define UNIFORM_BAGS_THREADS(T, suffix)                                                                         \
    void uniform_bags_##suffix##_threads(T *bags, int64_t width, T pad, const int64_t *sizes,                   \
                                         const int64_t *starts, int64_t num_bags, int64_t bags_per_table,         \
                                         const uint64_t *states, const int64_t *rows, uint64_t inc_hi,            \
                                         uint64_t inc_lo, int64_t num_parts)                                      \
    {                                                                                                           \
        _Pragma("omp parallel num_threads((int)num_parts)")                                                     \
        uniform_bags_##suffix(bags, width, pad, sizes, starts, num_bags, bags_per_table, states, rows, inc_hi,   \
                              inc_lo, omp_get_thread_num(), omp_get_num_threads());                             \
    }

UNIFORM_BAGS_THREADS(int32_t, i32)
UNIFORM_BAGS_THREADS(int64_t, i64)
#endif
#endif

/* Initial values of embedding tables: uniform in [low, high] in float32 from SplitMix64 (Steele, Lea and Flood, "Fast
 * splittable pseudorandom number generators", OOPSLA 2014; the mixing function of splitmix64 above), whose
 * word w from state `seed` is splitmix64(seed + w * 0x9e3779b97f4a7c15) (w = 0, 1, ...). Element e of a range
 * takes the low (e even) or high (e odd) 32 bits x of word e / 2: u = (x >> 8) * 2^-24 (24 random bits, exact
 * in float32), value = low + (high - low) * u, each operation rounded in float32. Every element is computed
 * alone (the loop vectorises), so the values do not depend on how a range is split across threads;
 * kernels.uniform_ computes the same numbers with NumPy where these kernels are not. low and high are finite
 * with a finite float32 difference (kernels.py checks), so no NaN arises.
 */
static ALWAYS_INLINE float uniform_element(uint64_t seed, int64_t e, float low, float scale)
{
    const uint64_t word = splitmix64(seed + (uint64_t)(e >> 1) * 0x9e3779b97f4a7c15ull);
    const uint32_t x = (uint32_t)(e & 1 ? word >> 32 : word);
    return low + scale * unit_f32(x);
}

/* Calls store(e, element e) for the elements e of part `part` of num_parts equal parts of [0, count) */
#define UNIFORM_FILL(store)                                                                                     \
    const float scale = high - low;                                                                             \
    const int64_t begin = count * part / num_parts, end = count * (part + 1) / num_parts;                       \
    for (int64_t e = begin; e < end; e++)                                                                       \
        store(e, uniform_element(seed, e, low, scale));

#define STORE_F32(i, value) out[i] = (value)
#define STORE_BF16(i, value) out[i] = f32_to_bf16_nearest(value)

/* out[e] = element e of the range, for the elements of part `part` of num_parts equal parts of [0, count) */
void uniform_fill_f32(float *restrict out, int64_t count, uint64_t seed, float low, float high,
                      int64_t part, int64_t num_parts)
{
    UNIFORM_FILL(STORE_F32)
}

/* uniform_fill_f32 rounded to bfloat16 */
void uniform_fill_bf16(uint16_t *restrict out, int64_t count, uint64_t seed, float low, float high,
                       int64_t part, int64_t num_parts)
{
    UNIFORM_FILL(STORE_BF16)
}

#ifdef _OPENMP
void uniform_fill_f32_threads(float *out, int64_t count, uint64_t seed, float low, float high,
                              int64_t num_parts)
{
#pragma omp parallel num_threads((int)num_parts)
    uniform_fill_f32(out, count, seed, low, high, omp_get_thread_num(), omp_get_num_threads());
}

void uniform_fill_bf16_threads(uint16_t *out, int64_t count, uint64_t seed, float low, float high,
                               int64_t num_parts)
{
#pragma omp parallel num_threads((int)num_parts)
    uniform_fill_bf16(out, count, seed, low, high, omp_get_thread_num(), omp_get_num_threads());
}
#endif
