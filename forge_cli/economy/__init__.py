"""The economy the node runs: prices (`pricing`), agent accounts and tokens (`accounts`) and
the safety gates every spend passes (`safety`)."""
