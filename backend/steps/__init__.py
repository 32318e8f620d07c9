"""Step protocol domain: agents upload sealed step messages, long-poll results, exchange client adapters."""
