-- wrk script: every connection waits about a second between requests, as an open dashboard tab polls.
-- `wrk -c200 -s bench/poll_1s.lua` is then 200 open pages (~200 requests/s), where plain `wrk -c200`
-- asks as fast as the server answers and measures its saturation instead. The wait is random
-- (0.5-1.5 s): tabs opened at different times do not poll in lockstep, and wrk starts all its
-- connections at once, so a fixed wait would keep 200 requests arriving in the same millisecond.
function delay()
  return math.random(500, 1500)
end
