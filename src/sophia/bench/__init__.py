"""Benchmarks, one module per ``sophia bench`` sub-command, each writing ``report.md`` and
``results.json`` (and plots, where it draws any) into ``--out-dir``:

* ``step`` (:mod:`sophia.bench.step`): the cost of one optimizer step, every variant side by side;
* ``overhead`` (:mod:`sophia.bench.overhead`): the wall-clock price of the Hessian estimate per training step;
* ``converge`` (:mod:`sophia.bench.converge`): steps, compute and time to AdamW's validation loss, every
  optimizer tuned alike over several seeds;
* ``toy`` (:mod:`sophia.bench.toy`): GD, Adam, SignGD, Newton and SophiaG on small problems with exact curvature.

:mod:`sophia.bench.machine` records the machine a measurement was taken on. The index of claims, scripts
and results folders is ``benchmarks/README.md``.
"""
