"""Route controllers; each calls ``fedobj.catalog``, ``fedobj.serving`` or
``fedobj.inference`` and nothing else holds logic of its own."""
