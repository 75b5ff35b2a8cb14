"""``execution-worker probe``: measure a broker account, write a profile (worker/mt5/profile).

- :mod:`.reads` terminal, account, symbols and server clock (no trading)
- :mod:`.clock` the server's offset from fresh ticks and the DST rule it implies (pure)
- :mod:`.naming` the proposed mapping of the RPM's canonical names (pure)
- :mod:`.queries` terminal queries asked again on None, counted
- :mod:`.magic` the probe's own magic range
- :mod:`.leftovers` finding and closing what an interrupted probe left open
- :mod:`.trades` round trips of the minimum volume, and what each one saw
- :mod:`.stats` percentiles, rates and comment cuts (pure)
- :mod:`.behaviour` round trips -> the profile's behaviour section (pure)
- :mod:`.safety` the real-account refusal
- :mod:`.summary` the human summary: what the worker will do differently here
- :mod:`.run` the whole probe on an open terminal; :mod:`.main` the command
"""
