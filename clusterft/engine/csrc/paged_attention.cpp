// Fused paged decode attention for CPU: one pass per request over its blocks (every KV head of a
// block in turn), online softmax (running max and sum per head, the accumulator rescaled once per
// block), no score tensors; fp32 accumulation for bf16/fp16 caches.
// The torch path in attention.py (_decode_attention) is the reference it is tested against.
// Beside it, a decoder layer's per-token element-wise steps, each one call instead of the torch
// path's 5-10 small ops per layer: rotary embedding in place, writing K/V into the cache, and the
// residual add with the RMSNorm after it. All compute exactly what the torch path computes (built
// with -ffp-contract=off: no FMA merges a multiply and an add), so results match it bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// The two hot loops, compiled for AVX-512 / AVX2 / baseline and picked at load time (GCC ifunc):
// a cache built on one x86 machine stays correct on another. `omp simd` lets the compiler
// vectorise the float reduction without -ffast-math.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLUSTERFT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLUSTERFT_CLONES
#endif

// The hot loops as templates on the head dim (a compile-time HD unrolls the per-token dot product
// and axpy fully; HD = 0 is any head dim), inlined into wrappers cloned per ISA below.
template <int64_t HD>
__attribute__((always_inline)) inline void scores_impl(const float* q, const float* k, int64_t group,
                                                       int64_t n, int64_t hd_rt, float scale, float* scores) {
  const int64_t hd = HD ? HD : hd_rt;
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * hd;
    for (int64_t t = 0; t < n; ++t) {
      const float* kt = k + t * hd;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < hd; ++d) s += qg[d] * kt[d];
      scores[g * n + t] = s * scale;
    }
  }
}

template <int64_t HD>
__attribute__((always_inline)) inline void accumulate_impl(const float* p, const float* v, int64_t n,
                                                           int64_t hd_rt, float corr, float* acc) {
  const int64_t hd = HD ? HD : hd_rt;
  if (corr != 1.f) {
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) acc[d] *= corr;
  }
  for (int64_t t = 0; t < n; ++t) {
    const float pt = p[t];
    const float* vt = v + t * hd;
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) acc[d] += pt * vt[d];
  }
}

// scores[g * n + t] = scale * q[g] . k[t] for g < group, t < n (rows of length hd).
CLUSTERFT_CLONES void block_scores(const float* q, const float* k, int64_t group, int64_t n,
                                   int64_t hd, float scale, float* scores) {
  switch (hd) {
    case 32: return scores_impl<32>(q, k, group, n, hd, scale, scores);
    case 64: return scores_impl<64>(q, k, group, n, hd, scale, scores);
    case 128: return scores_impl<128>(q, k, group, n, hd, scale, scores);
    default: return scores_impl<0>(q, k, group, n, hd, scale, scores);
  }
}

// acc[d] = acc[d] * corr + sum_t p[t] * v[t][d].
CLUSTERFT_CLONES void block_accumulate(const float* p, const float* v, int64_t n, int64_t hd,
                                       float corr, float* acc) {
  switch (hd) {
    case 32: return accumulate_impl<32>(p, v, n, hd, corr, acc);
    case 64: return accumulate_impl<64>(p, v, n, hd, corr, acc);
    case 128: return accumulate_impl<128>(p, v, n, hd, corr, acc);
    default: return accumulate_impl<0>(p, v, n, hd, corr, acc);
  }
}

// Rows [lo, lo + n) of a (block_size, hd) block as float: the block itself for fp32, else a copy.
template <typename scalar_t>
const float* as_float(const scalar_t* src, int64_t n, int64_t hd, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n * hd; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

template <typename scalar_t>
void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                   int64_t window, at::Tensor& out) {
  const int64_t num_decodes = q.size(0), num_heads = q.size(1), hd = q.size(2);
  const int64_t kvh = k_cache.size(1), bs = k_cache.size(2), max_blocks = block_tables.size(1);
  const int64_t group = num_heads / kvh;
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const float fscale = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // Blocks outer, KV heads inner: a block's heads are adjacent in the cache, so each block's K (and
  // V) is read as one contiguous run, as the hardware prefetcher and the TLB like it (heads outer
  // read 2 KB pieces 16 KB apart and were slower than the torch path in the engine).
  at::parallel_for(0, num_decodes, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(num_heads * hd), acc(num_heads * hd), scores(group * bs), m(num_heads), l(num_heads);
    std::vector<float> kbuf(bs * hd), vbuf(bs * hd);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t ctx = lens[r];
      const scalar_t* qr = q_ptr + r * num_heads * hd;  // head h * group + g: KV head h's group
      for (int64_t i = 0; i < num_heads * hd; ++i) qf[i] = static_cast<float>(qr[i]);
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), 0.f);
      // The decode token sits at ctx - 1: keys in [first, ctx) are visible.
      const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
      for (int64_t b = first / bs; b * bs < ctx; ++b) {
        const int64_t block = tables[r * max_blocks + b];
        const int64_t lo = std::max(first - b * bs, int64_t(0));
        const int64_t hi = std::min(ctx - b * bs, bs);
        const int64_t n = hi - lo;
        for (int64_t h = 0; h < kvh; ++h) {
          const int64_t base = ((block * kvh + h) * bs + lo) * hd;
          const float* kb = as_float(k_ptr + base, n, hd, kbuf.data());
          block_scores(qf.data() + h * group * hd, kb, group, n, hd, fscale, scores.data());
          const float* vb = as_float(v_ptr + base, n, hd, vbuf.data());
          for (int64_t g = 0; g < group; ++g) {
            const int64_t head = h * group + g;
            float* s = scores.data() + g * n;
            const float new_m = std::max(m[head], *std::max_element(s, s + n));
            const float corr = std::exp(m[head] - new_m);  // 0 on the first block (m = -inf)
            float sum = 0.f;
            for (int64_t t = 0; t < n; ++t) sum += (s[t] = std::exp(s[t] - new_m));
            l[head] = l[head] * corr + sum;
            m[head] = new_m;
            block_accumulate(s, vb, n, hd, corr, acc.data() + head * hd);
          }
        }
      }
      scalar_t* o = out_ptr + r * num_heads * hd;
      for (int64_t head = 0; head < num_heads; ++head) {
        const float inv = 1.f / l[head];
        for (int64_t d = 0; d < hd; ++d) o[head * hd + d] = static_cast<scalar_t>(acc[head * hd + d] * inv);
      }
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                                  double scale, int64_t sliding_window) {
  TORCH_CHECK(q.device().is_cpu(), "paged_decode_attention runs on CPU; use the torch backend on CUDA");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "expected q (D, h, hd) and k_cache, v_cache (num_blocks, kvh, block_size, hd)");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(1) == 0,
              "q's head_dim must equal the cache's and its heads be a multiple of the KV heads");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block_tables and context_lens must be int32");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) &&
                  context_lens.numel() == q.size(0),
              "block_tables must be (D, max_blocks) and context_lens (D,) for D = q.size(0)");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV caches must be contiguous");
  const at::Tensor qc = q.contiguous(), tables = block_tables.contiguous(), lens = context_lens.contiguous();
  if (lens.numel()) {  // a table shorter than its context would read past its row
    const int64_t longest = lens.max().item<int64_t>(), shortest = lens.min().item<int64_t>();
    TORCH_CHECK(shortest >= 1 && longest <= tables.size(1) * k_cache.size(2),
                "context_lens must be >= 1 and fit the block tables (max_blocks * block_size)");
  }
  at::Tensor out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(qc, k_cache, v_cache, tables, lens, scale, sliding_window, out);
  });
  return out;
}

// x[t, h] = x * cos + rotate_half(x) * sin for x (T, heads, hd) with unit stride in hd, the tables
// (P, hd) float32 read at positions[t]. Every op rounds to scalar_t, as the torch path's do: the
// tables are cast first, then each product and the sum.
template <typename scalar_t>
void rotate_in_place(const at::Tensor& x, const int64_t* pos, const float* cos, const float* sin) {
  const int64_t tokens = x.size(0), heads = x.size(1), hd = x.size(2), half = hd / 2;
  const int64_t st = x.stride(0), sh = x.stride(1);
  scalar_t* base = x.data_ptr<scalar_t>();
  at::parallel_for(0, tokens, 64, [&](int64_t lo, int64_t hi) {
    std::vector<scalar_t> c(hd), s(hd);
    for (int64_t t = lo; t < hi; ++t) {
      const float* ct = cos + pos[t] * hd;
      const float* stab = sin + pos[t] * hd;
      for (int64_t d = 0; d < hd; ++d) {
        c[d] = static_cast<scalar_t>(ct[d]);
        s[d] = static_cast<scalar_t>(stab[d]);
      }
      for (int64_t h = 0; h < heads; ++h) {
        scalar_t* xh = base + t * st + h * sh;
        for (int64_t i = 0; i < half; ++i) {
          const scalar_t x1 = xh[i], x2 = xh[i + half];
          const scalar_t a = x1 * c[i], b = -x2 * s[i];
          const scalar_t e = x2 * c[i + half], f = x1 * s[i + half];
          xh[i] = a + b;
          xh[i + half] = e + f;
        }
      }
    }
  });
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1,
              name, " must be a CPU tensor (T, heads, head_dim) with contiguous rows");
}

void rotary_embedding_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                       const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(q, "q");
  check_rows(k, "k");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(2) % 2 == 0 &&
                  q.scalar_type() == k.scalar_type(),
              "q and k must have the same tokens, head_dim (even) and dtype");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() &&
                  cos.size(1) == q.size(2),
              "cos and sin must be contiguous float32 tables (max_positions, head_dim)");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == q.size(0),
              "positions must be int64, one per token");
  const at::Tensor pos = positions.contiguous();
  if (pos.numel()) {
    TORCH_CHECK(pos.min().item<int64_t>() >= 0 && pos.max().item<int64_t>() < cos.size(0),
                "positions must lie in [0, ", cos.size(0), "), the rotary tables' length");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary_embedding_", [&] {
    rotate_in_place<scalar_t>(q, pos.data_ptr<int64_t>(), cos.data_ptr<float>(), sin.data_ptr<float>());
    rotate_in_place<scalar_t>(k, pos.data_ptr<int64_t>(), cos.data_ptr<float>(), sin.data_ptr<float>());
  });
}

// cache[slot / bs, h, slot % bs] = x[t, h] for k and v (T, kvh, hd) into (num_blocks, kvh, bs, hd).
void write_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
              const at::Tensor& slots) {
  check_rows(k, "k");
  check_rows(v, "v");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "k_cache and v_cache must be contiguous (num_blocks, kvh, block_size, hd)");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(1) == k_cache.size(1) && k.size(2) == k_cache.size(3),
              "k and v must be (T, kvh, hd) with the cache's kvh and hd");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "k, v and the caches must share a dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == k.size(0), "slots must be int64, one per token");
  const at::Tensor sl = slots.contiguous();
  const int64_t bs = k_cache.size(2), heads = k.size(1), hd = k.size(2);
  if (sl.numel()) {
    TORCH_CHECK(sl.min().item<int64_t>() >= 0 && sl.max().item<int64_t>() < k_cache.size(0) * bs,
                "slots must lie in [0, num_blocks * block_size)");
  }
  const int64_t* slot = sl.data_ptr<int64_t>();
  const size_t row = hd * k.element_size();
  const int64_t block_stride = heads * bs * hd, head_stride = bs * hd;
  for (const auto& [src, dst] : {std::pair{&k, &k_cache}, std::pair{&v, &v_cache}}) {
    const char* x = static_cast<const char*>(src->data_ptr());
    char* cache = static_cast<char*>(dst->data_ptr());
    const int64_t st = src->stride(0) * src->element_size(), sh = src->stride(1) * src->element_size();
    for (int64_t t = 0; t < src->size(0); ++t) {
      const int64_t off = (slot[t] / bs) * block_stride + (slot[t] % bs) * hd;
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(cache + (off + h * head_stride) * src->element_size(), x + t * st + h * sh, row);
      }
    }
  }
}

// (hidden + delta, RMSNorm(hidden + delta) * weight), fp32, in HF's op order: the mean of squares
// by the same ATen reduction the torch path calls (its summation order is ATen's), then
// x * (1 / sqrt(var + eps)) and weight * that, each rounded as torch's element-wise ops round.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& hidden, const at::Tensor& delta,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(hidden.device().is_cpu() && hidden.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "add_rms_norm takes float32 CPU tensors; other dtypes take the torch path");
  TORCH_CHECK(hidden.dim() == 2 && delta.sizes() == hidden.sizes() && delta.scalar_type() == at::kFloat &&
                  weight.dim() == 1 && weight.size(0) == hidden.size(1),
              "expected hidden and delta (T, H) and weight (H,)");
  const at::Tensor h = hidden.contiguous(), d = delta.contiguous(), w = weight.contiguous();
  at::Tensor sum = at::empty_like(h);
  const int64_t tokens = h.size(0), width = h.size(1);
  {
    const float *a = h.data_ptr<float>(), *b = d.data_ptr<float>();
    float* o = sum.data_ptr<float>();
    for (int64_t i = 0; i < tokens * width; ++i) o[i] = a[i] + b[i];
  }
  const at::Tensor var = at::mean(at::pow(sum, 2), -1, true);
  at::Tensor out = at::empty_like(h);
  const float *x = sum.data_ptr<float>(), *v = var.data_ptr<float>(), *wt = w.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, tokens, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const float r = 1.f / std::sqrt(v[t] + e);
      const float* xt = x + t * width;
      float* ot = o + t * width;
      for (int64_t i = 0; i < width; ++i) {
        const float n = xt[i] * r;
        ot[i] = wt[i] * n;
      }
    }
  });
  return {sum, out};
}

}  // namespace

TORCH_LIBRARY(clusterft, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int sliding_window) -> Tensor");
  m.def("rotary_embedding_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos, Tensor sin) -> ()");
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots) -> ()");
  m.def("add_rms_norm(Tensor hidden, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(clusterft, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("rotary_embedding_", &rotary_embedding_);
  m.impl("write_kv", &write_kv);
  m.impl("add_rms_norm", &add_rms_norm);
}
