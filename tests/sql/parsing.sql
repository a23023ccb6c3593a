-- Parser edge cases (tests/test_sqlfile.py): the rewrite must only touch real :parameters.

-- name: edge_cases
-- Comment with :not_a_param and a non-ASCII dash — before the parameters.
SELECT :x::int AS cast_value,
       ':y' AS quoted,
       E'it\'s :z' AS escaped,
       $$ :w $$ AS dollar,
       $tag$ :q $$ $tag$ AS tagged,
       'é' || :word AS accented, /* :cc /* nested :n */ */
       'abc' LIKE '%' || :word || '%' AS like_match,
       7 % 3 AS modulo,
       (ARRAY[1, 2, 3])[2:3] AS slice,
       make_interval(days := :x) AS named_argument,
       ":quoted" AS quoted_identifier -- :trailing
FROM (SELECT 'abc' AS ":quoted") AS t
WHERE :x = :x
