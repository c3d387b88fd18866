"""Ollama's API: ``protocol`` and ``responses`` (its shapes), ``names`` (its model names),
``generation`` (``/api/generate``, ``/api/chat``), ``models`` and ``pull`` (the rest),
``routes`` (the table), ``listener`` (its own port) and ``gotemplate`` (request templates)."""
