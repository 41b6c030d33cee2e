"""Triton kernels, one module per op (named as the op). Imported lazily, on first use, so that
`import genkern` never imports Triton and TRITON_INTERPRET=1 can still be set after `import genkern`."""
