"""RKLLama's REST API (seed 003): ``protocol`` (its shapes) and ``routes``."""
