"""Adapters that plug ctxkit into other frameworks.

Each subpackage imports only its own framework (`adapters.langchain` needs `langchain-core`, and
`langchain` for its agent middleware), so installing one adapter never requires the others.
"""
