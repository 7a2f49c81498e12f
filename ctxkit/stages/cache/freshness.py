"""Time-sensitive questions: those whose answer depends on when they are asked.

"What's the weather in Paris today?", "BTC price right now", "Is GitHub down?", "What's on my calendar this
week?" have another answer tomorrow (or in an hour); served from the cache a day later, the answer is wrong.
`time_cue` finds what ties a question to the moment of asking, so the stage can keep its answer for a short
time only (see SemanticCacheStage's `time_sensitive_ttl`).

Two kinds of cue:
- the moment itself, in any tense: now, currently, current, today, tonight, tomorrow, yesterday, this
  week, last night, next month, latest, newest, most recent, these days, so far, "how many days until";
- a topic that is live by nature, in the present tense only: the time or date, weather and forecasts,
  prices and exchange or interest rates, scores, news and headlines, whether a site is down, traffic, who
  is winning, the user's own calendar, inbox and deliveries. In the past tense, or tied to a year, month or
  season ("the price of oil in 1979", "the weather in Paris in July"), such a topic is history or climate.

"current" counts: "the current CEO of OpenAI", "the current name of Constantinople" ask for the state at the
moment of asking, and the cache cannot tell a lasting state from a changing one; a false alarm costs one
backend call a minute, a miss serves a stale answer until eviction. Not cues: dates and years named outright
("When did WWII end?", "What year was Python first released?"), "last" or "first" in a series ("the last
emperor of China"), "what is now X" (a place's present name in a history question), "now" that orders the next
step ("Now write the tests"), electric or ocean current, accounting's current account, ratio and assets, and
prices, scores, dates and "current" in how-to questions and code ("How do I get the current date in JavaScript?",
"Write a function that returns the price with tax").
"""

from __future__ import annotations

import re

_READ = 1000  # characters read at each end of a long message
_MOMENT = re.compile(
    r"\b(?:right now|now|at the moment|at present|presently|currently|nowadays|these days|as of (?:now|today)"
    r"|today|todays|tonight|tonights|tomorrow|tomorrows|yesterday|yesterdays"
    r"|live (?:scores?|stream|updates|results|coverage)|latest|newest|most recent|recently|trending|breaking news"
    r"|(?:this|last|next) (?:morning|afternoon|evening|night|week|weekend|month|year|season|quarter)s?"
    r"|(?:how (?:many|much) (?:days|weeks|hours|minutes|time)|how long) (?:(?:are|is) )?(?:left )?(?:until|till|before)"
    r")\b")
# "what is now Jacksonville", "now known as": a place's present name, asked about its history; "now" that orders
# the next step ("Now write the tests", "OK now add error handling", "I now need a parser", "now that we have it")
_NOT_A_MOMENT = re.compile(r"\b(?:(?:what|which) (?:is|are|was|were) now|now (?:known|called|named))\b"
                           r"|(?:^|[.!?:;] )(?:(?:ok|okay|and|so|but|alright|great|thanks)[,!.]? )?now\b"
                           r"|\b(?:i|we) now\b|\bnow that\b"
                           # a change told about code ("my code now throws", "the build now fails")
                           r"|\b(?:it|this|that|code|script|app|program|tests?|build|function|query) now\b"
                           # the user's own story ("I recently switched to Linux"), a compound ("recently-used")
                           r"|\b(?:i|we) (?:only )?recently\b|\brecently-")
# "current" as an adjective ("the current CEO"), not the noun ("electric current", "the current of a river")
_CURRENT = re.compile(r"(?<!electric )(?<!electrical )(?<!alternating )(?<!direct )(?<!ocean )(?<!rip )"
                      r"\bcurrent (?!of\b|is\b|flows?\b|through\b|in\b|measured\b|account|ratio|assets?\b|liabilit)[a-z]")
_LIVE_TOPIC = re.compile(
    r"\b(?:what time is it|what(?:'s| is) the time(?= in\b| now\b|\W*$)|time is it|what day is it|what(?:'s| is) the date|what year is it"
    r"|weather (?:in|at|for|like|today|now|outside)|the weather(?=\W*$)|forecast (?:for|in)|raining|snowing"
    r"|temperature outside"
    r"|price|prices|exchange rate|interest rates?|mortgage rates?|trading at|stock market|markets? doing"
    r"|how much is (?:a |an |one |1 )?(?:bitcoin|btc|ethereum|eth|gold|silver|oil|gas)"
    r"|worth (?:today|now)|(?:the|latest|live|final|halftime) scores?|scores? (?:of|for) (?:the|last|today|tonight)"
    r"|the news|any news|headlines"
    r"|(?:is|are) (?:the )?\S+(?: \S+)? (?:down|offline|up and running)(?=\W*$)|outages?"
    r"|traffic (?:on|in|at|near|like)|is there traffic"
    r"|who(?:'s| is) (?:winning|leading|ahead)|(?:the|latest|new|recent) polls?|polls? (?:say|show)"
    r"|my (?:calendar|schedule|agenda|meetings?|inbox|emails?|notifications|tasks|to-?do|delivery)"
    r"|where(?:'s| is) my (?:package|parcel|order)"
    r"|(?:shipped|arrived|delivered) yet|playing (?:tonight|today|now|nearby))\b")
# asking how a thing works, or what it is, is not asking for its present value ("How does an exchange rate
# regime work?", "What is the difference between weather and climate?")
_EXPLAINS = re.compile(r"^(?:how (?:does|do|is|are) \S+(?: \S+){0,3} (?:work|calculated|measured|set|made)\b"
                       r"|what(?:'s| is) the difference|explain|define|what does|why)")
# A how-to question asks for a procedure, not a present value ("How do I get the current date in JavaScript?",
# "How do I compute the F1 score?", "How do I route traffic to my pod?"): only a word for the moment itself
# counts in one ("How can I watch the game tonight?"). Code asked for or shown: prices, scores and dates in it are
# names and fields ("Write a function that returns the price with tax", "SELECT price FROM products").
_PROCEDURE = re.compile(r"^\W*(?:(?:thanks|ok|okay|great|so|and|now)\W+){0,2}(?:how (?:do|can|could|would|should|to)\b|how to\b)"
                        r"|^\W*(?:write|fix|refactor|implement|debug|generate) (?:a |an |the |this |my |me a )?"
                        r"(?:function|method|class|script|query|program|code|regex|test|sql)"
                        r"|\bselect\b[^;]{1,200}?\bfrom\b|```")
_HISTORICAL = re.compile(
    r"\b(?:was|were|did|had|used to)\b|\b1\d{3}\b|\b20\d{2}\b"
    r"|\b(?:in|during) (?:january|february|march|april|may|june|july|august|september|october|november"
    r"|december|spring|summer|autumn|fall|winter)\b")


def time_cue(text: str) -> str | None:
    """What ties `text`'s answer to the moment it is asked ("today", "weather", "current"...), or None."""
    if len(text) > 2 * _READ:  # a pasted document: the question is before or after it (and a lookup stays fast)
        text = f"{text[:_READ]} . {text[-_READ:]}"
    t = re.sub(r"\s+", " ", text.lower().replace("’", "'"))
    t = re.sub(r"(\w)'s\b", r"\1s", t)  # "today's", "Tonight's" -> "todays"
    t = t.replace("whats ", "what's ").replace("whos ", "who's ")
    found = _MOMENT.search(_NOT_A_MOMENT.sub(" ", t))
    if found:
        return found.group(0)
    if _PROCEDURE.search(t):
        return None
    found = _CURRENT.search(t)
    if found:
        return "current"
    found = _LIVE_TOPIC.search(t)
    if found and not _HISTORICAL.search(t) and not _EXPLAINS.search(t):
        return found.group(0)
    return None


__all__ = ["time_cue"]
