"""One decoding run per kernel route, for the tests of the decoding kernels' routes (not a test module).

:func:`decode_each_route` prefills a (2, 4) prompt into a :class:`~leanformer.decoding.StaticDecoder` (no
graph) and decodes three tokens, once per value of ``<route_module>.ROUTE``, counting the calls of the
kernel's op ``<route_module>.<op_name>``; the tests then assert the same tokens, close logits and how often
the kernel ran.
"""

import torch

from leanformer.decoding import StaticDecoder


def decode_each_route(copy, route_module, op_name: str, monkeypatch, device, routes=("never", "always"),
                      switch=None):
    """{route: (tokens (2, 10), logits of the 3 steps (3, 2, V), the kernel op's calls: a list of their
    argument tuples)} for each route. ``switch``: (module, attribute) that takes each route's value instead of
    ``route_module.ROUTE``."""
    calls: list[tuple] = []
    real = getattr(route_module, op_name)

    def counted(*args):
        calls.append(args)
        return real(*args)
    monkeypatch.setattr(route_module, op_name, counted)
    prompt = torch.randint(0, copy.cfg.vocab_size, (2, 4), generator=torch.Generator().manual_seed(1)).to(device)
    out = {}
    for route in routes:
        monkeypatch.setattr(*(switch or (route_module, "ROUTE")), route)
        calls.clear()
        dec = StaticDecoder(copy, 2, capacity=10, graph="none", prefill_chunk=4)
        dec.prefill(prompt)
        logits = []
        for _ in range(3):
            dec.step()
            logits.append(dec.logits.clone())
        out[route] = (dec.tokens.clone(), torch.stack(logits), list(calls))
    return out


def assert_same_decoding(out, a="never", b="always", rtol=1e-5):
    """Route ``b`` decodes route ``a``'s tokens, its logits within ``rtol`` of the largest."""
    assert torch.equal(out[a][0], out[b][0])
    ref = out[a][1]
    assert float((out[b][1] - ref).abs().max() / ref.abs().max()) <= rtol
