"""A jit kernel for tests/test_kernels.py: decodes int32 words with nibble_float. At module level
because the Triton interpreter re-reads a kernel's source with its module's globals (a kernel
defined inside a test cannot see the test's imports). Import it only after TRITON_INTERPRET is set."""
import triton
import triton.language as tl

from llmprune.kernels.triton_w4 import magic_words, nibble_float, nibble_unscale


@triton.jit
def decode(words_ptr, out_ptr, N: tl.constexpr):
    w = tl.load(words_ptr.to(tl.pointer_type(tl.int32)) + tl.arange(0, N))
    wm, hm = magic_words(w)
    for j in tl.static_range(8):
        tl.store(out_ptr + tl.arange(0, N) * 8 + j, nibble_float(wm, hm, j) * nibble_unscale(j))
