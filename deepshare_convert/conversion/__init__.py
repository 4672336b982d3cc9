"""The conversion pipeline: MODEL -> activation sites -> groups -> budgets -> shared gates -> OUT/.

One module per step, in the order they run (``docs/architecture.md`` draws the flow):

* :mod:`.tracing`  -- the fx tracer (leaf modules, fused-module decomposition) and shape propagation;
* :mod:`.census`   -- activation sites of a traced graph (the ReLU census), hidden ones inside leaves;
* :mod:`.grouping` -- consecutive same-shape sites -> layer-sharing groups; ``--keep``;
* :mod:`.budget`   -- ``--budget`` parsing and the allocator registry (prototypes per group);
* :mod:`.settings` -- :class:`ConversionSettings`, the one validated settings object;
* :mod:`.gates`    -- PrototypeGate / SharedGate (the DeepShare gate), their modes, ``set_gate_mode``;
* :mod:`.plan`     -- the JSON plan that replays a conversion, validated on load;
* :mod:`.passes`   -- site-rewriting passes on torch.fx's ``PassBase`` (requires -> call -> ensures);
* :mod:`.rewrite`  -- ``convert`` / ``apply_plan`` (the shared-gate pass) / ``save`` / ``load``.

What an activation *is* lives outside, in :mod:`deepshare_convert.activations`, because the
MPC lowering reads it too; other plan kinds (SNL) register in :mod:`deepshare_convert.conversion.plan_kinds`.
This ``__init__`` imports nothing, so ``import deepshare_convert.conversion.budget`` stays light
(the CLI lists allocators without importing torch).
"""
