{{/*
Monitoring (values `monitoring` and the tenants' backup.pushgateway / backup.notify): the exporter
that lists every tenant's catalog, the ServiceMonitor and PrometheusRule for it, and the metrics
and pings each run sends.
*/}}

{{/*
kura.tenantMonitoring (dict "root" $ "tenant" T), from kura.init: resolves the tenant's
backup.pushgateway into T.pushgatewayUrl ("" without) and backup.notify into T.notifyResolved
(empty without; else secret, key, create, url, cidrs, ports). The notify URL authorises pings, so
no message here ever prints it.
*/}}
{{- define "kura.tenantMonitoring" -}}
{{- $t := .tenant -}}
{{- $_ := set $t "pushgatewayUrl" (dig "pushgateway" "url" "" $t.backup | trimSuffix "/") -}}
{{- $n := $t.backup.notify | default dict -}}
{{- $notify := dict -}}
{{- if or $n.existingSecret $n.url -}}
{{- if and (not $n.existingSecret) (not (regexMatch "^https?://[^/\\s]+(/\\S*)?$" $n.url)) -}}
{{- fail (printf "tenant %q: backup.notify.url must be an http:// or https:// URL (the value is not shown: it authorises pings)" $t.name) -}}
{{- end -}}
{{- $cidrs := dig "egress" "cidrs" (list) $n -}}
{{- $ports := dig "egress" "ports" (list 443) $n -}}
{{- if and $t.backup.enabled .root.Values.networkPolicy.enabled (not (and $cidrs $ports)) -}}
{{- /* A rule without peers would let the backup pods reach every address. */ -}}
{{- fail (printf "tenant %q: with backup.notify, backup.notify.egress.cidrs (and ports) must name the addresses of the ping endpoint for the NetworkPolicy: resolve its host from inside the cluster (kubectl run --rm -it dns --image=busybox --restart=Never -- nslookup <host>) and list them, e.g. [104.21.0.0/16]" $t.name) -}}
{{- end -}}
{{- $notify = dict "secret" ($n.existingSecret | default (include "kura.objectName" (list $t.name "notify" 63))) "key" ($n.key | default "url") "create" (not $n.existingSecret) "url" ($n.url | default "") "cidrs" $cidrs "ports" $ports -}}
{{- end -}}
{{- $_ := set $t "notifyResolved" $notify -}}
{{- end -}}

{{/*
kura.runEnv (dict "tenant" T "notify" BOOL): what a backup, prune, verify or restore run needs to
report, as JSON {"env": [EnvVar…], "clients": [NetworkPolicy client label…]}: KURA_PUSHGATEWAY_URL
(plain: not a secret) and, with "notify", KURA_NOTIFY_URL, only ever from its Secret.
*/}}
{{- define "kura.runEnv" -}}
{{- $env := list -}}
{{- $clients := list -}}
{{- with .tenant.pushgatewayUrl -}}
{{- $env = append $env (dict "name" "KURA_PUSHGATEWAY_URL" "value" .) -}}
{{- $clients = append $clients "pushgateway" -}}
{{- end -}}
{{- if .notify -}}
{{- with .tenant.notifyResolved -}}
{{- $env = append $env (dict "name" "KURA_NOTIFY_URL" "valueFrom" (dict "secretKeyRef" (dict "name" .secret "key" .key))) -}}
{{- $clients = append $clients "notify" -}}
{{- end -}}
{{- end -}}
{{- toJson (dict "env" $env "clients" $clients) -}}
{{- end -}}

{{/*
kura.initMonitoring: resolves `monitoring` once per render into the root's `KuraMonitoring`:
  exporter: name, objectStorage (objectStorage with monitoring.exporter.objectStorage merged over it
            and the exporter's own credentials), credentialKinds, secret (its credentials' Secret);
  watched:  the tenants with backups in the store the exporter reads (their age alerts);
  elsewhere: names of the tenants whose backups go to another bucket, prefix or endpoint;
  pushgateway: whether any run pushes metrics (the failed-run alert reads them).
and refuses what cannot work: an exporter without credentials, a ServiceMonitor or alert rules
without the exporter whose series they read.
*/}}
{{- define "kura.initMonitoring" -}}
{{- if not (hasKey . "KuraMonitoring") -}}
{{- include "kura.init" . -}}
{{- $root := . -}}
{{- $m := .Values.monitoring -}}
{{- $ex := $m.exporter -}}
{{- $name := printf "%s-exporter" (include "kura.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- $os := deepCopy .Values.objectStorage -}}
{{- include "kura.merge" (dict "dst" $os "src" (deepCopy ($ex.objectStorage | default dict))) -}}
{{- $_ := set $os "credentials" (deepCopy $ex.credentials) -}}
{{- $kinds := include "kura.credentialKinds" $ex.credentials | fromJson -}}
{{- if $ex.enabled -}}
{{- if not (or $kinds.hmac $kinds.apikey) -}}
{{- fail "monitoring.exporter.enabled needs credentials of its own, read-only ones (a service credential or service ID with the Reader role on the bucket): set monitoring.exporter.credentials.accessKeyId and secretAccessKey (ICOS HMAC keys), apikey (an IBM Cloud API key), or existingSecret (a Secret in the release namespace, with credentials.type saying which of them it holds)" -}}
{{- end -}}
{{- if and $kinds.apikey .Values.networkPolicy.enabled (not (and $os.iamEgress.cidrs $os.iamEgress.ports)) -}}
{{- fail (printf "monitoring.exporter: with an API key, objectStorage.iamEgress (or monitoring.exporter.objectStorage.iamEgress) cidrs and ports must name where %s is" $os.iamEndpoint) -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (not (and $os.egress.cidrs $os.egress.ports)) -}}
{{- fail "monitoring.exporter: objectStorage.egress (or monitoring.exporter.objectStorage.egress) cidrs and ports must name where the object store is" -}}
{{- end -}}
{{- end -}}
{{- if and $m.serviceMonitor.enabled (not $ex.enabled) -}}
{{- fail "monitoring.serviceMonitor.enabled scrapes the exporter: set monitoring.exporter.enabled (and its credentials)" -}}
{{- end -}}
{{- if and $m.rules.enabled (not $ex.enabled) -}}
{{- fail "monitoring.rules.enabled: the backup-age, incomplete-backup and exporter alerts read the exporter's series, which only monitoring.exporter.enabled provides (the failed-run alert alone, from the Pushgateway, would leave a backup that never runs unnoticed): set monitoring.exporter.enabled" -}}
{{- end -}}
{{- $location := printf "%s %s" (include "kura.storageUrl" (dict "objectStorage" $os)) ($os.endpoint | trimSuffix "/") -}}
{{- $watched := list -}}
{{- $elsewhere := list -}}
{{- $pushgateway := false -}}
{{- range $t := .KuraTenants -}}
{{- if $t.backup.enabled -}}
{{- if eq (printf "%s %s" (include "kura.storageUrl" $t) ($t.objectStorage.endpoint | trimSuffix "/")) $location -}}
{{- $watched = append $watched $t -}}
{{- else -}}
{{- $elsewhere = append $elsewhere $t.name -}}
{{- end -}}
{{- end -}}
{{- if and $t.pushgatewayUrl (or $t.backup.enabled $t.verify.enabled $t.restore.enabled) -}}
{{- $pushgateway = true -}}
{{- end -}}
{{- end -}}
{{- $exporter := dict "name" $name "objectStorage" $os "credentialKinds" $kinds "secret" ($ex.credentials.existingSecret | default $name) "location" (include "kura.storageUrl" (dict "objectStorage" $os)) -}}
{{- $_ := set . "KuraMonitoring" (dict "exporter" $exporter "watched" $watched "elsewhere" $elsewhere "pushgateway" $pushgateway) -}}
{{- end -}}
{{- end -}}

{{/* kura.durationSeconds DURATION: 90s, 5m, 36h, 7d, 2w as a number of seconds. */}}
{{- define "kura.durationSeconds" -}}
{{- $text := toString . -}}
{{- if not (regexMatch "^[0-9]+[smhdw]$" $text) -}}
{{- fail (printf "%q is not a duration (a number and s, m, h, d or w, e.g. 2h)" $text) -}}
{{- end -}}
{{- $unit := substr (sub (len $text) 1 | int) (len $text) $text -}}
{{- mul (trimSuffix $unit $text | atoi) (get (dict "s" 1 "m" 60 "h" 3600 "d" 86400 "w" 604800) $unit) -}}
{{- end -}}

{{/* kura.durationText SECONDS: the shortest exact Prometheus duration: 26h, 90m, 45s. */}}
{{- define "kura.durationText" -}}
{{- $s := int . -}}
{{- if eq (mod $s 3600) 0 -}}{{ div $s 3600 }}h
{{- else if eq (mod $s 60) 0 -}}{{ div $s 60 }}m
{{- else -}}{{ $s }}s
{{- end -}}
{{- end -}}

{{/*
kura.cronValues (dict "field" F "min" LO "max" HI "names" NAMES): the values one cron field
matches (`*`, `?`, N, N-M, with /STEP, comma lists; NAMES maps lowercase names such as `mon` to
numbers), as a sorted JSON list; "" for anything else (L, W, #, a range that wraps).
*/}}
{{- define "kura.cronValues" -}}
{{- $ok := true -}}
{{- $found := dict -}}
{{- range $part := splitList "," .field -}}
{{- $pieces := splitList "/" $part -}}
{{- $step := 1 -}}
{{- if eq (len $pieces) 2 -}}
{{- if regexMatch "^[1-9][0-9]*$" (index $pieces 1) }}{{ $step = atoi (index $pieces 1) }}{{ else }}{{ $ok = false }}{{ end -}}
{{- else if gt (len $pieces) 2 -}}
{{- $ok = false -}}
{{- end -}}
{{- $lo := int $.min -}}
{{- $hi := int $.max -}}
{{- $range := index $pieces 0 -}}
{{- if not (has $range (list "*" "?")) -}}
{{- $ends := list -}}
{{- range $end := splitList "-" $range -}}
{{- $e := lower $end -}}
{{- if regexMatch "^[0-9]+$" $e -}}
{{- $ends = append $ends (atoi $e) -}}
{{- else if hasKey $.names $e -}}
{{- $ends = append $ends (int (get $.names $e)) -}}
{{- else -}}
{{- $ok = false -}}
{{- end -}}
{{- end -}}
{{- if eq (len $ends) 1 -}}
{{- $lo = int (index $ends 0) -}}
{{- /* N/STEP is N-MAX/STEP */ -}}
{{- if eq (len $pieces) 1 }}{{ $hi = $lo }}{{ end -}}
{{- else if eq (len $ends) 2 -}}
{{- $lo = int (index $ends 0) -}}
{{- $hi = int (index $ends 1) -}}
{{- else -}}
{{- $ok = false -}}
{{- end -}}
{{- end -}}
{{- if or (lt $lo (int $.min)) (gt $hi (int $.max)) (gt $lo $hi) -}}
{{- $ok = false -}}
{{- end -}}
{{- if $ok -}}
{{- range $v := untilStep $lo (add $hi 1 | int) $step -}}
{{- $_ := set $found (printf "%03d" $v) true -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and $ok $found -}}
{{- $values := list -}}
{{- range $key := keys $found | sortAlpha -}}
{{- $values = append $values (atoi $key) -}}
{{- end -}}
{{- toJson $values -}}
{{- end -}}
{{- end -}}

{{/*
kura.cronGapSeconds SCHEDULE: the longest time between two runs of a cron schedule, in seconds, or
"" when the chart cannot tell. It reads @hourly…@yearly and five fields whose month is `*`, with
the day of the week or the day of the month (up to the 28th, so that every month has it)
restricted, not both. Runs are sorted as (day, hour, minute), so the gaps are those between
consecutive minutes of an hour, between consecutive hours of a day (last minute to first), and
between consecutive days (last run of one to first run of the next), wrapping around the week or
the longest month.
*/}}
{{- define "kura.cronGapSeconds" -}}
{{- $expr := trim . -}}
{{- $macros := dict "@yearly" 31622400 "@annually" 31622400 "@monthly" 2678400 "@weekly" 604800 "@daily" 86400 "@midnight" 86400 "@hourly" 3600 -}}
{{- $fields := regexSplit "\\s+" $expr -1 -}}
{{- if hasKey $macros $expr -}}
{{- get $macros $expr -}}
{{- else if eq (len $fields) 5 -}}
{{- $days := dict "sun" 0 "mon" 1 "tue" 2 "wed" 3 "thu" 4 "fri" 5 "sat" 6 -}}
{{- $anyDom := has (index $fields 2) (list "*" "?") -}}
{{- $anyDow := has (index $fields 4) (list "*" "?") -}}
{{- $mText := include "kura.cronValues" (dict "field" (index $fields 0) "min" 0 "max" 59 "names" dict) -}}
{{- $hText := include "kura.cronValues" (dict "field" (index $fields 1) "min" 0 "max" 23 "names" dict) -}}
{{- $dText := "[0]" -}}
{{- $period := 1 -}}
{{- if not $anyDow -}}
{{- $dText = include "kura.cronValues" (dict "field" (index $fields 4) "min" 0 "max" 7 "names" $days) -}}
{{- $period = 7 -}}
{{- else if not $anyDom -}}
{{- $dText = include "kura.cronValues" (dict "field" (index $fields 2) "min" 1 "max" 31 "names" dict) -}}
{{- $period = 31 -}}
{{- /* The 29th to 31st are missing from some months, which makes gaps longer than they look. */ -}}
{{- if and $dText (gt (last (fromJsonArray $dText) | int) 28) }}{{ $dText = "" }}{{ end -}}
{{- end -}}
{{- if and $mText $hText $dText (eq (index $fields 3) "*") (or $anyDom $anyDow) -}}
{{- $minutes := list -}}{{- range fromJsonArray $mText }}{{ $minutes = append $minutes (int .) }}{{ end -}}
{{- $hours := list -}}{{- range fromJsonArray $hText }}{{ $hours = append $hours (int .) }}{{ end -}}
{{- $dayList := dict -}}
{{- range fromJsonArray $dText }}{{ $_ := set $dayList (printf "%02d" (ternary 0 (int .) (and (eq $period 7) (eq (int .) 7)))) true }}{{ end -}}
{{- $daysRun := list -}}{{- range keys $dayList | sortAlpha }}{{ $daysRun = append $daysRun (atoi .) }}{{ end -}}
{{- $firstOfDay := add (mul (first $hours) 60) (first $minutes) | int -}}
{{- $lastOfDay := add (mul (last $hours) 60) (last $minutes) | int -}}
{{- $gap := 0 -}}
{{- range $i := until (sub (len $minutes) 1 | int) -}}
{{- $gap = max $gap (sub (index $minutes (add $i 1)) (index $minutes $i)) -}}
{{- end -}}
{{- range $i := until (sub (len $hours) 1 | int) -}}
{{- $gap = max $gap (add (mul (sub (index $hours (add $i 1)) (index $hours $i)) 60) (sub (first $minutes) (last $minutes))) -}}
{{- end -}}
{{- range $i := until (sub (len $daysRun) 1 | int) -}}
{{- $gap = max $gap (add (mul (sub (index $daysRun (add $i 1)) (index $daysRun $i)) 1440) (sub $firstOfDay $lastOfDay)) -}}
{{- end -}}
{{- $gap = max $gap (add (mul (sub (add (first $daysRun) $period) (last $daysRun)) 1440) (sub $firstOfDay $lastOfDay)) -}}
{{- mul $gap 60 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
kura.backupMaxAge (dict "root" $ "tenant" T): how old the newest complete backup of the tenant may
be before KuraBackupTooOld fires, as JSON {"seconds": N, "basis": TEXT}: the tenant's
status.maxAge when set (the same limit its status Job applies); else the longest gap between two
runs of its backup schedule, plus an hour in a time zone with daylight saving time (a day that
long), plus monitoring.rules.backupAgeSlack (how late a run may start and how long it may take).
*/}}
{{- define "kura.backupMaxAge" -}}
{{- $t := .tenant -}}
{{- $root := .root -}}
{{- if $t.status.maxAge -}}
{{- toJson (dict "seconds" (include "kura.durationSeconds" $t.status.maxAge | int) "basis" (printf "its status.maxAge, %s" $t.status.maxAge)) -}}
{{- else -}}
{{- $gap := include "kura.cronGapSeconds" $t.schedules.backup -}}
{{- if not $gap -}}
{{- fail (printf "tenant %q: monitoring.rules cannot tell how often the backup schedule %q runs (it reads minutes, hours, days of the week, days of the month up to the 28th, and @hourly, @daily, @weekly, @monthly, @yearly): set tenants.%s.status.maxAge to the age the newest backup may reach, e.g. 26h" $t.name $t.schedules.backup $t.name) -}}
{{- end -}}
{{- $gap = int $gap -}}
{{- $zone := $root.Values.schedule.timeZone -}}
{{- $dst := 0 -}}
{{- if and (gt $gap 3600) (not (regexMatch "^(Etc/)?(UTC|UCT|GMT([+-][0-9]{1,2})?|Universal|Zulu|Greenwich)$" $zone)) -}}
{{- $dst = 3600 -}}
{{- end -}}
{{- $slackText := $root.Values.monitoring.rules.backupAgeSlack -}}
{{- $slack := include "kura.durationSeconds" $slackText | int -}}
{{- $basis := printf "schedule %q (%s) runs at least every %s, plus %s slack" $t.schedules.backup $zone (include "kura.durationText" $gap) $slackText -}}
{{- if $dst }}{{ $basis = printf "%s and an hour for daylight saving time" $basis }}{{ end -}}
{{- toJson (dict "seconds" (add $gap $dst $slack) "basis" $basis) -}}
{{- end -}}
{{- end -}}
