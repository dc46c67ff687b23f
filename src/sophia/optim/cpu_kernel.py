"""The Sophia step on CPU as one C++ kernel over all tensors of a param group.

One pass per element reads p, g, m, h and writes p, m (the update's 6 memory streams, no temporaries),
in one parallel region over all elements of all tensors (``at::parallel_for`` on torch's intra-op
threads: each thread one contiguous share, whichever tensors it spans), vectorised by the compiler at
``-O3``. Built without ``-march`` (it runs on any CPU of the architecture); on x86-64 CPUs with AVX2, FMA
and F16C a variant compiled for those is chosen at run time.

Its arithmetic is the for-loop path's, operation for operation (``lerp_``, ``mul_``, ``clamp_min``,
division, ``clamp_``, ``add_`` with ``alpha``), in float32 for float32, float16 and bfloat16 tensors (stored
back rounded once) and float64 for float64, with the two multiply-adds fused where the variant has FMA (as
torch's AVX2/AVX-512 CPU kernels fuse them) and rounded twice where it has not (as torch's default kernels):
bitwise equal to the for-loop path where torch runs its AVX2 or AVX-512 kernels, within float rounding
elsewhere.

Built on first use with torch's extension builder (a C++ compiler, and ninja: the ``ninja`` package is a
dependency), into torch's extension cache (``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), keyed
by the source, the flags and the torch version, so later processes only load it. Without a compiler (or
when the build fails), :func:`available` is False after a one-line warning, and the optimizers use the
per-tensor loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["available", "kernel_info", "sophia_step_", "unavailable_reason"]

_SOURCE = r"""
// The Sophia step over a list of CPU tensors, in one parallel pass (sophia/optim/cpu_kernel.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#if defined(__GNUC__) || defined(__clang__)
#define SOPHIA_INLINE inline __attribute__((always_inline))
#else
#define SOPHIA_INLINE inline
#endif

namespace {

template <typename T>
struct Settings {
  T lr, weight, rho, decay, eps;
  bool small_weight;  // |weight| < 0.5: torch's lerp takes m + w * (g - m), else g - (1 - w) * (g - m)
  bool maximize;
};

// Multiply-adds as torch's vectorised CPU kernels do them: fused where the instruction set has FMA (torch's
// AVX2/AVX-512/NEON builds), rounded twice where it has not (its default build).
#if defined(__FP_FAST_FMAF) && defined(__FP_FAST_FMA)
constexpr bool kGenericFMA = true;
#else
constexpr bool kGenericFMA = false;
#endif

template <bool FUSED, typename T>
SOPHIA_INLINE T madd(T a, T b, T c) {
  if constexpr (FUSED) return std::fma(a, b, c);
  else return a * b + c;
}

// m = lerp(m, g, w); p = p * decay; p = p - lr * clamp(m / max(rho * h, eps), -1, 1), in T arithmetic with
// the rounding of torch's CPU kernels behind the for-loop path: lerp_ and add_(alpha) are multiply-adds,
// the rest rounds each operation. Inlined into each instruction-set variant below, so that std::fma is one
// instruction where the variant has FMA.
template <typename S, typename T, bool SMALL, bool MAXIMIZE, bool FUSED>
SOPHIA_INLINE void span(S* __restrict p, const S* __restrict g, S* __restrict m, const S* __restrict h,
                        int64_t n, const Settings<T>& s) {
  const T neg_lr = -s.lr, w = SMALL ? s.weight : s.weight - T(1), rho = s.rho, decay = s.decay, eps = s.eps;
  for (int64_t i = 0; i < n; ++i) {
    T gi = static_cast<T>(g[i]);
    if (MAXIMIZE) gi = -gi;
    const T m0 = static_cast<T>(m[i]);
    const T mi = madd<FUSED>(w, gi - m0, SMALL ? m0 : gi);
    T d = static_cast<T>(h[i]) * rho;
    d = d < eps ? eps : d;  // max(rho * h, eps); nan stays nan, as in torch's clamp_min
    T r = mi / d;
    r = r < T(-1) ? T(-1) : r;
    r = r > T(1) ? T(1) : r;
    m[i] = static_cast<S>(mi);
    p[i] = static_cast<S>(madd<FUSED>(r, neg_lr, static_cast<T>(p[i]) * decay));
  }
}

template <typename S, typename T, bool FUSED>
SOPHIA_INLINE void span_any(S* p, const S* g, S* m, const S* h, int64_t n, const Settings<T>& s) {
  if (s.small_weight) {
    if (s.maximize) span<S, T, true, true, FUSED>(p, g, m, h, n, s);
    else span<S, T, true, false, FUSED>(p, g, m, h, n, s);
  } else {
    if (s.maximize) span<S, T, false, true, FUSED>(p, g, m, h, n, s);
    else span<S, T, false, false, FUSED>(p, g, m, h, n, s);
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SOPHIA_X86_VARIANTS 1
#define SOPHIA_F16C __attribute__((target("avx2,fma,f16c")))
#include <immintrin.h>

// float16 <-> float32 with F16C, 8 at a time (the compilers do not vectorise c10::Half's conversions); called,
// not inlined, from code that may be compiled for any x86-64.
SOPHIA_F16C void half_to_float(const c10::Half* src, float* dst, int64_t n) {
  const auto* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(s[i]);
}

SOPHIA_F16C void float_to_half(const float* src, c10::Half* dst, int64_t n) {
  auto* d = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {  // round to nearest even, as c10::Half
    const __m128i half = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), half);
  }
  for (; i < n; ++i) d[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif

// float16 tensors where F16C is at hand: blocks converted to float32 (in L1), stepped, the results converted back.
template <bool F16C>
struct HalfSpan {
  template <bool SMALL, bool MAXIMIZE>
  static SOPHIA_INLINE void run(c10::Half* p, const c10::Half* g, c10::Half* m, const c10::Half* h, int64_t n,
                                const Settings<float>& s) {
#ifdef SOPHIA_X86_VARIANTS
    if constexpr (F16C) {
      constexpr int64_t kBlock = 512;
      alignas(64) float bp[kBlock], bg[kBlock], bm[kBlock], bh[kBlock];
      for (int64_t i = 0; i < n; i += kBlock) {
        const int64_t k = std::min(kBlock, n - i);
        half_to_float(p + i, bp, k);
        half_to_float(g + i, bg, k);
        half_to_float(m + i, bm, k);
        half_to_float(h + i, bh, k);
        span<float, float, SMALL, MAXIMIZE, true>(bp, bg, bm, bh, k, s);
        float_to_half(bm, m + i, k);
        float_to_half(bp, p + i, k);
      }
      return;
    }
#endif
    span<c10::Half, float, SMALL, MAXIMIZE, kGenericFMA>(p, g, m, h, n, s);
  }
};

template <bool F16C>
SOPHIA_INLINE void half_any(c10::Half* p, const c10::Half* g, c10::Half* m, const c10::Half* h, int64_t n,
                            const Settings<float>& s) {
  using H = HalfSpan<F16C>;
  if (s.small_weight) {
    if (s.maximize) H::template run<true, true>(p, g, m, h, n, s);
    else H::template run<true, false>(p, g, m, h, n, s);
  } else {
    if (s.maximize) H::template run<false, true>(p, g, m, h, n, s);
    else H::template run<false, false>(p, g, m, h, n, s);
  }
}

struct Work {
  std::vector<void*> p, m;
  std::vector<const void*> g, h;
  std::vector<at::ScalarType> dtype;
  std::vector<int64_t> start;  // prefix sums of the element counts; start.back() is the total
};

template <typename S, typename T, bool FUSED>
SOPHIA_INLINE void span_of(const Work& w, size_t t, int64_t lo, int64_t n, const Settings<T>& s) {
  span_any<S, T, FUSED>(static_cast<S*>(w.p[t]) + lo, static_cast<const S*>(w.g[t]) + lo, static_cast<S*>(w.m[t]) + lo,
                 static_cast<const S*>(w.h[t]) + lo, n, s);
}

// Elements [begin, end) of the concatenation of all tensors. F16C: the AVX2+FMA+F16C variant.
template <bool F16C>
SOPHIA_INLINE void run_range(const Work& w, int64_t begin, int64_t end, const Settings<float>& sf,
                             const Settings<double>& sd) {
  size_t t = std::upper_bound(w.start.begin(), w.start.end(), begin) - w.start.begin() - 1;
  for (; t + 1 < w.start.size() && w.start[t] < end; ++t) {
    const int64_t lo = std::max(begin, w.start[t]) - w.start[t];
    const int64_t n = std::min(end, w.start[t + 1]) - w.start[t] - lo;
    if (n <= 0) continue;
    switch (w.dtype[t]) {
      case at::kFloat: span_of<float, float, F16C || kGenericFMA>(w, t, lo, n, sf); break;
      case at::kDouble: span_of<double, double, F16C || kGenericFMA>(w, t, lo, n, sd); break;
      case at::kBFloat16: span_of<c10::BFloat16, float, F16C || kGenericFMA>(w, t, lo, n, sf); break;
      case at::kHalf:
        half_any<F16C>(static_cast<c10::Half*>(w.p[t]) + lo, static_cast<const c10::Half*>(w.g[t]) + lo,
                       static_cast<c10::Half*>(w.m[t]) + lo, static_cast<const c10::Half*>(w.h[t]) + lo, n, sf);
        break;
      default: break;
    }
  }
}

void run_generic(const Work& w, int64_t b, int64_t e, const Settings<float>& sf, const Settings<double>& sd) {
  run_range<false>(w, b, e, sf, sd);
}

#ifdef SOPHIA_X86_VARIANTS
SOPHIA_F16C void run_avx2(const Work& w, int64_t b, int64_t e, const Settings<float>& sf, const Settings<double>& sd) {
  run_range<true>(w, b, e, sf, sd);
}
#endif

using RangeFn = void (*)(const Work&, int64_t, int64_t, const Settings<float>&, const Settings<double>&);

RangeFn pick() {
#ifdef SOPHIA_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return run_avx2;
  }
#endif
  return run_generic;
}

RangeFn range_fn = pick();

// For tests: "generic" runs the portable variant (as on CPUs without AVX2/FMA/F16C), "best" the one chosen.
std::string set_variant(std::string name) {
  TORCH_CHECK(name == "generic" || name == "best", "set_variant: name must be 'generic' or 'best', got ", name);
  range_fn = name == "generic" ? run_generic : pick();
  return name;
}

bool floating(const at::Tensor& t) {
  const auto d = t.scalar_type();
  return d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16;
}

bool plain(const at::Tensor& t, const at::Tensor& p) {
  return t.device().is_cpu() && t.layout() == at::kStrided && t.scalar_type() == p.scalar_type() &&
         t.numel() == p.numel() && t.is_contiguous() && !t.is_neg() && !t.is_conj();
}

template <typename T>
Settings<T> settings(double lr, double weight, double rho, double decay, double eps, bool maximize) {
  const T w = static_cast<T>(weight);
  return {static_cast<T>(lr), w, static_cast<T>(rho), static_cast<T>(decay), static_cast<T>(eps),
          std::abs(w) < T(0.5), maximize};
}

// Updates every index whose four tensors are dense contiguous CPU tensors of one floating dtype and
// returns the other indices, for the caller's general path.
std::vector<int64_t> sophia_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                 at::TensorList hessians, double lr, double weight, double rho, double decay,
                                 double eps, bool maximize) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && hessians.size() == n,
              "sophia_step_: params, grads, exp_avgs and hessians must have the same length");
  Work w;
  w.start.push_back(0);
  std::vector<int64_t> skipped;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &p = params[i], &g = grads[i], &m = exp_avgs[i], &h = hessians[i];
    if (!(floating(p) && plain(p, p) && plain(g, p) && plain(m, p) && plain(h, p))) {
      skipped.push_back(static_cast<int64_t>(i));
      continue;
    }
    // an in-place update: bump the version counters, as torch's in-place ops do
    p.unsafeGetTensorImpl()->bump_version();
    m.unsafeGetTensorImpl()->bump_version();
    if (p.numel() == 0) continue;
    w.p.push_back(p.data_ptr());
    w.g.push_back(g.const_data_ptr());
    w.m.push_back(m.data_ptr());
    w.h.push_back(h.const_data_ptr());
    w.dtype.push_back(p.scalar_type());
    w.start.push_back(w.start.back() + p.numel());
  }
  const auto sf = settings<float>(lr, weight, rho, decay, eps, maximize);
  const auto sd = settings<double>(lr, weight, rho, decay, eps, maximize);
  // One parallel region for the whole list: each thread takes one contiguous share of all elements,
  // whichever tensors it spans (small tensors cost no fork of their own).
  at::parallel_for(0, w.start.back(), at::internal::GRAIN_SIZE,
                   [&](int64_t begin, int64_t end) { range_fn(w, begin, end, sf, sd); });
  return skipped;
}

std::string kernel_info() {
#ifdef _OPENMP
  std::string s = "parallel (OpenMP)";
#else
  std::string s = "serial";
#endif
  if (range_fn != run_generic) return s + ", AVX2+FMA+F16C";
  return s + (kGenericFMA ? ", generic (FMA)" : ", generic (no FMA)");
}

}  // namespace

TORCH_LIBRARY(sophia_lab, m) {
  m.def("sophia_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor[] hessians, "
        "float lr, float weight, float rho, float decay, float eps, bool maximize) -> int[]",
        &sophia_step);
  m.def("kernel_info() -> str", &kernel_info);
  m.def("set_variant(str name) -> str", &set_variant);
}
"""

# -fno-trapping-math: the clamps vectorise without AVX too (the values are IEEE's either way; only floating-point
# exception flags, which nothing reads, may differ). OpenMP for at::parallel_for, whose OpenMP body is inline in
# torch's headers: without it the kernel is serial. The extension then shares torch's own libgomp (same soname,
# already loaded).
_OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
_CFLAGS = ["-O3", "-fno-trapping-math", *_OPENMP]
_LDFLAGS = _OPENMP

_lock = threading.Lock()
_op = None  # torch.ops.sophia_lab.sophia_step_ once loaded
_failure: str | None = None  # why it is not available (set once; the warning is given once)


def _digest() -> str:
    key = "\0".join([_SOURCE, *_CFLAGS, *_LDFLAGS, torch.__version__, str(torch.version.git_version)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _build_directory(name: str) -> str:
    """Torch's extension cache (``TORCH_EXTENSIONS_DIR``, else its user cache directory), one folder per build
    key; found without importing torch's extension builder, which is needed only to build."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        try:
            from torch._appdirs import user_cache_dir

            root = os.path.realpath(user_cache_dir(appname="torch_extensions"))
        except Exception:  # a torch without its private helper
            root = os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


@contextlib.contextmanager
def _exclusive(path: str) -> Iterator[None]:
    """An exclusive lock that dies with its process (torch's own build lock is a file that a killed build
    leaves behind, and every later build would wait on it forever)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock only
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ninja_on_path() -> None:
    """Torch's extension builder runs ``ninja`` from PATH. The ``ninja`` package (a dependency of sophia-lab)
    installs it next to the interpreter, which is not on PATH when a virtual environment is used without
    being activated (``.venv/bin/sophia``): its folder is added to this process's PATH then."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja  # the PyPI package
    except ImportError:
        return
    folder = getattr(ninja, "BIN_DIR", None)
    if folder and os.path.isfile(os.path.join(folder, "ninja" + (".exe" if os.name == "nt" else ""))):
        os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")


def _missing_tool() -> str | None:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found)"
    _ninja_on_path()
    if not cpp_extension.is_ninja_available():
        return "ninja, which torch's extension builder needs, is not installed (pip install ninja)"
    return None


def _load() -> None:
    global _op
    name = f"sophia_lab_cpu_{_digest()}"
    directory = _build_directory(name)
    library = os.path.join(directory, name + (".pyd" if os.name == "nt" else ".so"))  # torch's builder's names
    built = os.path.join(directory, "built")  # written after a build that loaded: the library is whole
    if not os.path.exists(built):
        missing = _missing_tool()
        if missing is not None:
            raise RuntimeError(missing)
        from torch.utils import cpp_extension

        with _exclusive(os.path.join(os.path.dirname(directory), f"{name}.lock")):
            if not os.path.exists(built):
                # holding the lock, nobody else is building: a leftover of an interrupted build goes
                for entry in os.listdir(directory):
                    target = os.path.join(directory, entry)
                    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
                kwargs = dict(no_implicit_headers=True) if _takes_no_implicit_headers() else {}
                cpp_extension.load_inline(name, [_SOURCE], extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
                                          build_directory=directory, is_python_module=False, **kwargs)
                with open(built, "w") as f:
                    f.write(torch.ops.sophia_lab.kernel_info() + "\n")
    if not hasattr(torch.ops.sophia_lab, "sophia_step_"):
        torch.ops.load_library(library)
    _op = torch.ops.sophia_lab.sophia_step_


def _takes_no_implicit_headers() -> bool:
    import inspect

    from torch.utils import cpp_extension

    return "no_implicit_headers" in inspect.signature(cpp_extension.load_inline).parameters


def available() -> bool:
    """Whether the kernel can run here; builds or loads it on the first call. Without a compiler, or when
    the build fails, it warns once (one line) and returns False from then on."""
    global _failure
    if _op is not None:
        return True
    if _failure is not None:
        return False
    with _lock:
        if _op is None and _failure is None:
            try:
                _load()
            except Exception as e:  # any failure to build or load: the per-tensor loop instead
                first = str(e).strip().splitlines()
                _failure = f"{type(e).__name__}: {first[0] if first else ''}"
                warnings.warn(f"sophia: the C++ CPU kernel of the Sophia step is not available ({_failure}); "
                              "CPU steps use the per-tensor loop (slower)", RuntimeWarning, stacklevel=2)
    return _op is not None


def unavailable_reason() -> str | None:
    """Why the kernel is not available (after :func:`available` returned False), else None."""
    return _failure


def _set_variant(name: str) -> None:
    """For tests: ``"generic"`` runs the portable variant (as on CPUs without AVX2, FMA and F16C), ``"best"``
    the one chosen for this CPU."""
    torch.ops.sophia_lab.set_variant(name)


def kernel_info() -> str | None:
    """How the loaded kernel runs (threads, instruction set), or None when it is not available."""
    return str(torch.ops.sophia_lab.kernel_info()) if available() else None


def sophia_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                 hessians: Sequence[Tensor], *, lr: float, beta1: float, rho: float, weight_decay: float,
                 eps: float, maximize: bool) -> list[int]:
    """One Sophia step in place on the tensors the kernel takes (dense, contiguous CPU tensors of float32,
    float64, float16 or bfloat16, the four of an index of one dtype); returns the indices of the others,
    left untouched. Call :func:`available` first."""
    if _op is None:
        raise RuntimeError("sophia's C++ CPU kernel is not loaded; call sophia.optim.cpu_kernel.available() first")
    return list(_op(params, grads, exp_avgs, hessians, float(lr), 1 - float(beta1), float(rho),
                    1 - float(lr) * float(weight_decay), float(eps), bool(maximize)))
