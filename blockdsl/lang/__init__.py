"""The language: .block text -> IR -> Plan. Never imports torch.

In pipeline order: `parse` (grammar, syntax errors, includes) -> `build` (parse tree to
`ir` nodes) -> `resolve` (IR to `blockdsl.plan.Plan`, a package of phases). `expr` is the
one expression evaluator (the resolver's and the search's), `errors` the located errors
every stage raises, `render` a Plan back to .block text.
"""
