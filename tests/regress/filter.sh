#!/bin/sh
# pg_regress runs psql through this launcher (--launcher): it runs the psql
# command line it is given and masks, in what psql prints, the values that
# differ from one run to the next, so results compare with expected outputs:
#
#   pg:{fp:N}:...          grant keys                    -> <grant>
#   {fp:N}:<uuid>          execution ids (random uuid)   -> {fp:N}:<uuid>
#   8-4-4-4-12 hex         any other uuid                -> <uuid>
#   date and time          ISO (2026-11-23 17:59:00.123+00, ...T...Z) and
#                          Postgres style (Mon Nov 23 09:59:00.123 2026 PST)
#                                                        -> <timestamp>
#   13-digit unix ms       1600000000000..1999999999999  -> <ms>
#   LOCATION: lines        source file and line of an error (VERBOSITY verbose): dropped
#
# and, because masked values and timestamps change column widths, runs of
# spaces collapse to one, trailing spaces go, and table rules (---+---)
# become a fixed '-+-' shape.
"$@" 2>&1 | sed -E \
  -e '/^LOCATION:  /d' \
  -e 's/pg:\{fp:[0-9]+\}:[^ |",'"'"']+/<grant>/g' \
  -e 's/\{fp:[0-9]+\}:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/{fp:N}:<uuid>/g' \
  -e 's/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/<uuid>/g' \
  -e 's/[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([+-][0-9]{2}(:[0-9]{2})?|Z)?/<timestamp>/g' \
  -e 's/(Mon|Tue|Wed|Thu|Fri|Sat|Sun) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [ 0-9][0-9] [0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)? [0-9]{4}( [A-Z]{3,5})?/<timestamp>/g' \
  -e 's/\b1[6-9][0-9]{11}\b/<ms>/g' \
  -e 's/  +/ /g' \
  -e 's/ +$//' \
  -e '/^-+(\+-+)*$/ s/-+/-/g' \
  -e 's/^(-\[ RECORD [0-9]+ \]).*/\1/'
