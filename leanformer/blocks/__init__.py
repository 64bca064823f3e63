"""Block wirings (Pre-LN, parallel, SAS, SAS-P, ...), looked up through ``leanformer.registry``."""
